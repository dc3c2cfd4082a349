"""Answering ``POST /v1/chat/completions`` and ``POST /v1/completions``, whole or as server-sent events.

The two endpoints differ only in how a request becomes prompt ids and in the shape of a choice; an
:class:`Endpoint` (:data:`CHAT`, :data:`COMPLETION`) holds those differences, and :func:`answer` does the
rest the same way for both: check the request, start its :class:`Generation`, and answer the text whole
or stream it as chunks (``data: {json}`` events, then ``data: [DONE]``).

The chat prompt is built by :func:`zaizai.inference.prompt.fit_conversation`: the rendering the trainer used,
no more earlier exchanges than the model was trained to follow (as ``zaizai chat`` keeps: none for a model of
one-exchange dialogues; :attr:`Server.history` overrides), oldest turns dropped so that prompt + reply budget
fit the model's block_size. A plain-text prompt is cut by :func:`zaizai.inference.prompt.fit_text`, keeping
its end.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response, StreamingResponse

from ..common.errors import ZaizaiError
from ..data.tokenizer import END_ID, EOT_ID
from ..inference import prompt
from .scheduler import Generation, GenerationFailed, QueueFull, Scheduler, Submission
from .schemas import APIError, ChatRequest, CompletionRequest, Sampling, error_body


@dataclass
class Server:
    """What every request reads: the model, the worker, the name the model is served under, the limits."""

    bot: Any  # a zaizai.inference.loaded.Zaizai
    scheduler: Scheduler
    model_name: str
    token_cap: int  # --max-tokens
    api_key: str | None = None
    history: int | None = None  # earlier exchanges a chat prompt keeps; None: as the model was trained

    @property
    def block_size(self) -> int:
        return self.bot.model_config.block_size

    @property
    def max_history(self) -> int | None:
        return prompt.history_limit(self.bot, self.history)


# --- what differs between the endpoints ---------------------------------------------------------------------------


def choice(key: str, value, finish: str | None) -> dict:
    return {"index": 0, key: value, "logprobs": None, "finish_reason": finish}


class Endpoint:
    """How one endpoint builds its prompt and shapes its choices (see :data:`CHAT` and :data:`COMPLETION`)."""

    id_prefix: str
    object: str        # of the whole response
    chunk_object: str  # of each streamed chunk

    def prompt(self, server: Server, body) -> tuple[list[int], set[int]]:
        """The prompt ids and the ids that end the reply."""
        raise NotImplementedError

    def opening(self) -> list[dict]:
        """The choices sent before the first piece of text, one chunk each."""
        return []

    def piece(self, text: str) -> dict:
        raise NotImplementedError

    def ending(self, finish: str) -> dict:
        raise NotImplementedError

    def whole(self, body, text: str, finish: str) -> dict:
        raise NotImplementedError


class Chat(Endpoint):
    id_prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def prompt(self, server: Server, body: ChatRequest) -> tuple[list[int], set[int]]:
        block_size, messages = server.block_size, body.conversation()
        reply = prompt.reply_budget(body.reply_tokens(server.token_cap), block_size)
        if not server.bot.is_chat_model:  # a plain-text model continues the last message, as `zaizai chat` does
            return prompt.fit_text(server.bot.tokenizer, messages[-1]["content"], block_size, reply), {EOT_ID}
        try:
            ids, _ = prompt.fit_conversation(server.bot.tokenizer, messages, block_size, reply, server.max_history)
        except ZaizaiError as e:
            raise APIError(400, str(e), param="messages") from None
        if len(ids) >= block_size:
            raise APIError(400, f"the system message is too long for this model's context of {block_size} "
                           "tokens; shorten it", param="messages")
        return ids, {END_ID, EOT_ID}

    def opening(self) -> list[dict]:
        return [choice("delta", {"role": "assistant", "content": ""}, None)]

    def piece(self, text: str) -> dict:
        return choice("delta", {"content": text}, None)

    def ending(self, finish: str) -> dict:
        return choice("delta", {}, finish)

    def whole(self, body: ChatRequest, text: str, finish: str) -> dict:
        return choice("message", {"role": "assistant", "content": text}, finish)


class Completion(Endpoint):
    id_prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def prompt(self, server: Server, body: CompletionRequest) -> tuple[list[int], set[int]]:
        reply = prompt.reply_budget(body.reply_tokens(server.token_cap), server.block_size)
        ids = prompt.fit_text(server.bot.tokenizer, body.text(), server.block_size, reply)
        return ids, ({EOT_ID, END_ID} if server.bot.is_chat_model else {EOT_ID})

    def piece(self, text: str) -> dict:
        return choice("text", text, None)

    def ending(self, finish: str) -> dict:
        return choice("text", "", finish)

    def whole(self, body: CompletionRequest, text: str, finish: str) -> dict:
        return choice("text", body.text() + text if body.echo else text, finish)


CHAT, COMPLETION = Chat(), Completion()


# --- server-sent events -------------------------------------------------------------------------------------------

SSE_DONE = "data: [DONE]\n\n"


def sse(data: dict) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(e: Exception) -> str:
    """An error after the headers are sent, reported in the stream (in the API's error shape)."""
    if isinstance(e, GenerationFailed):
        return sse(error_body(str(e), "server_error", code="generation_failed"))
    return sse(error_body(str(e), "invalid_request_error" if isinstance(e, ZaizaiError) else "server_error"))


# --- answering a request ------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One request's answer: the id, time and model that its response, or each of its chunks, carries."""

    endpoint: Endpoint
    model: str
    include_usage: bool
    id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self):
        self.id = self.endpoint.id_prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def response(self, object: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        data = self.response(self.endpoint.chunk_object, choices)
        if self.include_usage:
            data["usage"] = usage  # null but in the last chunk, as OpenAI sends it
        return sse(data)


@contextlib.contextmanager
def generation_errors() -> Iterator[None]:
    """A full queue is a 429, a request the engine refuses (say, ids out of range) a 400, a generation whose
    scores became nan/inf a 500 (the others in the batch went on)."""
    try:
        yield
    except QueueFull:
        raise APIError(429, "the server is busy: too many requests are waiting; try again shortly",
                       "rate_limit_error", code="queue_full") from None
    except GenerationFailed as e:
        raise APIError(500, str(e), "server_error", code="generation_failed") from None
    except ZaizaiError as e:
        raise APIError(400, str(e)) from None


def start_generation(server: Server, body: Sampling, ids: list[int], stop_ids: set[int]) -> Generation:
    sampling = body.sampling(server.token_cap)
    try:
        sampling.validate()
    except ZaizaiError as e:
        raise APIError(400, str(e)) from None
    return Generation(server.bot, ids, sampling, set() if body.ignore_eos else stop_ids, body.stops())


class GenerationStream(StreamingResponse):
    """A streamed answer that cancels its generation when it ends, however it ends (the client went away, even
    before the first chunk was sent; the server stopped): its batch row is freed before the next step."""

    def __init__(self, content, submission: Submission, **kwargs):
        super().__init__(content, **kwargs)
        self.submission = submission

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submission.close()


async def answer(endpoint: Endpoint, body: Sampling, server: Server, request):
    """The response to ``body`` at ``endpoint``: a dict (the whole text) or a stream of chunks."""
    body.check_token_cap(server.token_cap)
    ids, stop_ids = endpoint.prompt(server, body)
    generation = start_generation(server, body, ids, stop_ids)
    reply = Reply(endpoint, server.model_name, body.include_usage())
    with generation_errors():
        # submitted now, so that a full queue is a 429 and not a broken stream; the client is watched meanwhile
        submission = Submission(server.scheduler, generation, request)
    try:
        with generation_errors():
            if body.stream:  # answered once its prompt is in the batch (a prompt the model refuses is still a 4xx)
                if not await submission.started():
                    return Response(status_code=499)  # (the client has gone: nobody reads this)
                submission.stop_watching()  # (the streaming response listens for the client from now on)
                stream, submission = submission, None
                return GenerationStream(chunks(reply, generation, stream), stream, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text = await submission.text()
    finally:
        if submission is not None:
            submission.close()
    whole = reply.response(endpoint.object, [endpoint.whole(body, text, generation.finish_reason)])
    return {**whole, "usage": generation.usage()}


async def chunks(reply: Reply, generation: Generation, submission: Submission) -> AsyncIterator[str]:
    """The streamed answer: the opening chunk, one chunk per piece of text, the finish reason, the usage; an error
    (a generation whose scores became nan/inf) as an error event."""
    endpoint = reply.endpoint
    try:
        for opening in endpoint.opening():
            yield reply.chunk([opening])
        while (piece := await submission.next_piece()) is not None:
            yield reply.chunk([endpoint.piece(piece)])
        yield reply.chunk([endpoint.ending(generation.finish_reason)])
        if reply.include_usage:
            yield reply.chunk([], generation.usage())
    except Exception as e:  # noqa: BLE001 (headers are sent: report it in the stream)
        yield sse_error(e)
    finally:
        submission.close()
    yield SSE_DONE
