"""An OpenAI-compatible HTTP API and a chat page for a trained model: ``zaizai serve OUT_DIR``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also
streamed as server-sent events), ``GET /health``, the chat page at ``/`` and the OpenAPI page at ``/docs``.

Safe by default: it binds 127.0.0.1; with an API key (``--api-key`` or ``ZAIZAI_API_KEY``) every ``/v1``
call needs ``Authorization: Bearer KEY``. Request bodies, messages and ``max_tokens`` are capped, and every
mistake in a request is answered 4xx with an OpenAI-shaped error body ``{"error": {message, type, param, code}}``.

Generation is CPU/GPU-bound PyTorch, so it runs in one worker thread (:class:`Scheduler`), never on the
event loop. The worker interleaves up to ``max_active`` generations token by token (round robin: a new
request gets its first token after one step of each running one, not after they all finish); further
requests wait in a bounded queue, and a full queue is answered 429. A client that disconnects stops its
generation before the next token.

The chat prompt is built by :func:`zaizai.inference.chat.build_prompt`: the rendering the trainer used, oldest turns
dropped so that prompt + reply budget fit the model's block_size.
"""

import asyncio
import contextlib
import hmac
import json
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from ..common.errors import ZaizaiError

MAX_BODY_BYTES = 1 << 20          # a request body larger than 1 MiB is refused (413)
MAX_MESSAGE_CHARS = 100_000       # one message's text
MAX_MESSAGES = 1024
MAX_STOP_CHARS = 64
MAX_TOKENS_LIMIT = 4096           # the largest max_tokens the schema allows; --max-tokens lowers it
DEFAULT_MAX_TOKENS = 256
MIN_TOP_P = 1e-6
MIN_TEMPERATURE = 1e-3          # below this, sampling is greedy (as it is in effect; dividing by ~0 overflows)
API_KEY_ENV = "ZAIZAI_API_KEY"
WEB_DIR = Path(__file__).parent / "web"


# --- the generation worker -------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One generation: ``make_stream()`` (called in the worker) gives the text pieces; ``emit`` hands each
    event to the event loop: ("piece", text), ("done", None) or ("error", exception)."""

    make_stream: Callable[[], Iterator[str]]
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: Iterator[str] | None = None


class Scheduler:
    """One thread that runs generations, up to ``max_active`` interleaved, ``max_waiting`` more queued."""

    def __init__(self, max_active: int = 4, max_waiting: int = 64):
        if max_active < 1 or max_waiting < 0:
            raise ZaizaiError("--max-active must be >= 1 and --max-waiting >= 0")
        self.max_active, self.max_waiting = max_active, max_waiting
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.admitted = 0            # jobs submitted and not finished (active + waiting)
        self.active = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, name="zaizai-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.admitted >= self.max_active + self.max_waiting:
                raise QueueFull
            self.admitted += 1
        self.jobs.put(job)

    def stats(self) -> dict:
        with self.lock:
            return {"active": self.active, "waiting": self.admitted - self.active, "completed": self.completed,
                    "cancelled": self.cancelled, "failed": self.failed}

    def close(self) -> None:
        self.jobs.put(None)

    def _finish(self, job: Job, outcome: str, event: tuple | None = None, was_active: bool = True) -> None:
        if job.stream is not None and hasattr(job.stream, "close"):
            job.stream.close()  # ends the token generator too: no further forward passes
        with self.lock:
            self.admitted -= 1
            self.active -= was_active
            setattr(self, outcome, getattr(self, outcome) + 1)
        if event is not None:
            job.emit(event)

    def _run(self) -> None:
        running: deque[Job] = deque()
        while True:
            while len(running) < self.max_active:  # admit waiting jobs (block only when idle)
                try:
                    job = self.jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    return
                if job.cancelled.is_set():
                    self._finish(job, "cancelled", was_active=False)
                    continue
                with self.lock:
                    self.active += 1
                try:
                    job.stream = job.make_stream()
                except Exception as e:  # noqa: BLE001 (handed to the request, which answers it)
                    self._finish(job, "failed", ("error", e))
                    continue
                running.append(job)
            if not running:
                continue
            job = running.popleft()
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            try:
                piece = next(job.stream)
            except StopIteration:
                self._finish(job, "completed", ("done", None))
                continue
            except Exception as e:  # noqa: BLE001
                self._finish(job, "failed", ("error", e))
                continue
            job.emit(("piece", piece))
            running.append(job)


# --- generation of one request -----------------------------------------------------------------------------------


class Generation:
    """The text of one request as it is generated, with token counts and why it ended."""

    def __init__(self, bot, ids: list[int], sampling, stop_ids: set[int], stop: list[str]):
        self.bot, self.ids, self.sampling, self.stop_ids, self.stop = bot, ids, sampling, stop_ids, stop
        self.completion_tokens = 0
        self.exhausted = False  # the token generator ran to its end (max_tokens or a stop id)

    def _counted(self) -> Iterator[int]:
        for token in self.bot.stream_ids(self.ids, self.sampling, self.stop_ids):
            self.completion_tokens += 1
            yield token
        self.exhausted = True

    def stream(self) -> Iterator[str]:
        from ..inference.loaded import IncrementalDecoder, decode_stream

        return decode_stream(self._counted(), IncrementalDecoder(self.bot.tokenizer), self.stop)

    @property
    def finish_reason(self) -> str:
        hit_length = self.exhausted and self.completion_tokens >= self.sampling.max_new_tokens
        return "length" if hit_length else "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.ids) + self.completion_tokens}


async def run_job(scheduler: Scheduler, generation: Generation, request=None):
    """Submit ``generation`` and yield its text pieces on the event loop; cancelling (or closing) this
    generator, or the client going away, stops the generation."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(generation.stream, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    scheduler.submit(job)  # QueueFull -> 429 before anything is sent
    try:
        while True:
            if request is None:
                kind, value = await events.get()
            else:  # not streamed: nothing is written until the end, so look for a disconnect now and then
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        job.cancelled.set()


# --- the app -----------------------------------------------------------------------------------------------------


def create_app(bot, *, api_key: str | None = None, model_name: str | None = None, max_tokens: int = MAX_TOKENS_LIMIT,
               max_active: int = 4, max_waiting: int = 64, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app serving ``bot`` (a :class:`zaizai.inference.loaded.Zaizai`)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    Text = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..inference.chat import build_prompt
    from ..inference.sampling import SamplingConfig
    from ..data.tokenizer import END_ID, EOT_ID

    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ZaizaiError(f"--max-tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}")
    model_name = model_name or f"zaizai-{Path(bot.path).parent.name or 'model'}"
    block_size = bot.model_config.block_size
    token_cap = max_tokens  # (a name the request classes below can see: they have fields called max_tokens)
    scheduler = Scheduler(max_active=max_active, max_waiting=max_waiting)

    class APIError(Exception):
        def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                     code: str | None = None):
            self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                       headers=None):
        body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    # -- request bodies (unknown fields are ignored, as tools send many) --

    class Body(BaseModel):
        model_config = ConfigDict(extra="ignore")

    class TextPart(Body):
        type: Literal["text"]
        text: Text

    class Message(Body):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[Text, Annotated[list[TextPart], Field(max_length=256)]]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class StreamOptions(Body):
        include_usage: bool = False

    StopField = Optional[Union[Annotated[str, Field(max_length=MAX_STOP_CHARS)],
                               Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=4)]]]

    class Sampling(Body):
        model: str | None = Field(default=None, max_length=256)
        temperature: float = Field(default=0.8, ge=0, le=2)
        top_p: float = Field(default=1.0, ge=0, le=1)
        top_k: int = Field(default=0, ge=0, le=1_000_000, description="zaizai extension: keep the k most likely")
        repetition_penalty: float = Field(default=1.0, ge=0.01, le=100, description="zaizai extension; 1 = off")
        max_tokens: int | None = Field(default=None, ge=0, le=token_cap)
        seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
        stop: StopField = None
        n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
        stream: bool = False
        stream_options: StreamOptions | None = None
        ignore_eos: bool = Field(default=False, description="keep generating past the end of the reply "
                                 "(as in vLLM; for benchmarks)")

        def sampling(self) -> SamplingConfig:
            # top_p 0 keeps only the best token; so, in effect, do a top_p or temperature near 0 (which would
            # underflow in float32 or overflow the logits), so those are greedy
            greedy = self.top_p < MIN_TOP_P or self.temperature < MIN_TEMPERATURE
            temperature = 0.0 if greedy else self.temperature
            return SamplingConfig(max_new_tokens=self.reply_tokens(), temperature=temperature, top_k=self.top_k,
                                  top_p=1.0 if greedy else self.top_p, repetition_penalty=self.repetition_penalty,
                                  seed=self.seed)

        def reply_tokens(self) -> int:
            return min(token_cap, DEFAULT_MAX_TOKENS) if self.max_tokens is None else self.max_tokens

        def stops(self) -> list[str]:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            if any(len(s) > MAX_STOP_CHARS for s in stops):
                raise APIError(400, f"stop strings may be at most {MAX_STOP_CHARS} characters", param="stop")
            return stops

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
        max_completion_tokens: int | None = Field(default=None, ge=0, le=token_cap)

        def reply_tokens(self) -> int:
            if self.max_completion_tokens is not None:
                return self.max_completion_tokens
            return super().reply_tokens()

    class CompletionRequest(Sampling):
        prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=1)]]
        echo: bool = False

        def text(self) -> str:
            if isinstance(self.prompt, str):
                return self.prompt
            if len(self.prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            if len(self.prompt[0]) > MAX_MESSAGE_CHARS:
                raise APIError(400, f"the prompt may be at most {MAX_MESSAGE_CHARS} characters", param="prompt")
            return self.prompt[0]

    # -- the app --

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="zaizai", version="1", description=__doc__.split("\n\n")[0], lifespan=lifespan)
    app.state.bot, app.state.scheduler, app.state.model_name = bot, scheduler, model_name
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    api = [Depends(check_key)]

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(e.status, e.message, e.type, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{err.get('msg', 'invalid')}" for err in errors[:5])
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
        return error_response(400, message or "invalid request", param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug: still answered in the API's shape
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((WEB_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "chat_model": bot.is_chat_model, "block_size": block_size,
                "auth": api_key is not None, **scheduler.stats()}

    @app.get("/v1/models", dependencies=api)
    async def models() -> dict:
        created = int(Path(bot.path).stat().st_mtime) if Path(bot.path).exists() else 0
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "zaizai", "chat": bot.is_chat_model,
                                            "context_length": block_size}]}

    def fit_completion(text: str, reply: int) -> list[int]:
        ids = [EOT_ID] + list(bot.tokenizer.encode(text))
        budget = max(1, block_size - min(reply, block_size // 2))
        return ids if len(ids) <= budget else [EOT_ID] + ids[len(ids) - budget + 1:]

    def make_generation(body: Sampling, ids: list[int], stop_ids: set[int]) -> Generation:
        sampling = body.sampling()
        try:
            sampling.validate()
        except ZaizaiError as e:
            raise APIError(400, str(e)) from None
        return Generation(bot, ids, sampling, set() if body.ignore_eos else stop_ids, body.stops())

    async def respond(body: Sampling, generation: Generation, request: Request, kind: str):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        def chunk(choices: list, usage=None) -> str:
            data = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                    "model": model_name, "system_fingerprint": None, "choices": choices}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        if body.stream:
            pieces = run_job(scheduler, generation)
            try:  # admit now, so that a full queue is a 429 and not a broken stream
                first = await anext_or_none(pieces)
            except QueueFull:
                raise APIError(429, "the server is busy: too many requests are waiting; try again shortly",
                               "rate_limit_error", code="queue_full") from None
            except ZaizaiError as e:
                raise APIError(400, str(e)) from None

            async def events():
                try:
                    if kind == "chat":
                        yield chunk([choice(None, None, first=True)])
                    piece = first
                    while piece is not None:
                        yield chunk([choice(piece, None)])
                        piece = await anext_or_none(pieces)
                    yield chunk([choice(None if kind == "chat" else "", generation.finish_reason)])
                    if include_usage:
                        yield chunk([], generation.usage())
                except Exception as e:  # noqa: BLE001 (headers are sent: report it in the stream)
                    status = "invalid_request_error" if isinstance(e, ZaizaiError) else "server_error"
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': status, 'param': None, 'code': None}}, ensure_ascii=False)}\n\n"
                finally:
                    await pieces.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text = []
        try:
            async for piece in run_job(scheduler, generation, request):
                text.append(piece)
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are waiting; try again shortly",
                           "rate_limit_error", code="queue_full") from None
        except ZaizaiError as e:
            raise APIError(400, str(e)) from None
        text = "".join(text)
        if kind == "chat":
            choices = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": generation.finish_reason}]
        else:
            if getattr(body, "echo", False):
                text = body.text() + text
            choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}]
        return {"id": rid, "object": obj, "created": created, "model": model_name, "system_fingerprint": None,
                "choices": choices, "usage": generation.usage()}

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(body: ChatRequest, request: Request):
        reply = body.reply_tokens()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if bot.is_chat_model:
            try:
                ids = build_prompt(bot.tokenizer, messages, block_size, min(reply, block_size // 2))
            except ZaizaiError as e:
                raise APIError(400, str(e), param="messages") from None
            if len(ids) >= block_size:
                raise APIError(400, f"the system message is too long for this model's context of {block_size} "
                               "tokens; shorten it", param="messages")
            stop_ids = {END_ID, EOT_ID}
        else:  # a plain-text model continues the last message (completion mode, as `zaizai chat` does)
            ids, stop_ids = fit_completion(messages[-1]["content"], reply), {EOT_ID}
        return await respond(body, make_generation(body, ids, stop_ids), request, "chat")

    @app.post("/v1/completions", dependencies=api)
    async def completions(body: CompletionRequest, request: Request):
        ids = fit_completion(body.text(), body.reply_tokens())
        stop_ids = {EOT_ID, END_ID} if bot.is_chat_model else {EOT_ID}
        return await respond(body, make_generation(body, ids, stop_ids), request, "completion")

    return app


async def anext_or_none(agen):
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (by its Content-Length, or while
    it is read when it has none), before the app parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    from starlette.exceptions import HTTPException
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.limit} bytes", "type":
                                     "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def serve(out_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          which: str = "auto", device: str = "auto", max_tokens: int = MAX_TOKENS_LIMIT, max_active: int = 4,
          max_waiting: int = 64) -> None:
    """Load the model in ``out_dir`` and serve it until interrupted (see the module docstring)."""
    try:
        import uvicorn
    except ImportError:
        raise ZaizaiError("serving needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    from ..inference.loaded import load

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    bot = load(out_dir, which=which, device=device)
    app = create_app(bot, api_key=api_key, max_tokens=max_tokens, max_active=max_active, max_waiting=max_waiting)
    shown = f"[{host}]" if ":" in host else host
    print(f"崽崽 zaizai · {bot}\n聊天页面 chat page: http://{shown}:{port}/   API: http://{shown}:{port}/v1   "
          f"docs: http://{shown}:{port}/docs")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"注意 note: serving on {host} without an API key: anyone who can reach it can use it "
              f"(set --api-key or {API_KEY_ENV})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
