"""The API's request bodies (pydantic models, OpenAI's fields plus a few of zaizai's) and its error.

Unknown fields are ignored, as tools send many. Every limit here is the same for every server except
``max_tokens``: the schema documents the largest any server allows (:data:`MAX_TOKENS_LIMIT`), and each
server checks its own ``--max-tokens`` with :meth:`Sampling.check_token_cap`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..inference.sampling import SamplingConfig

MAX_MESSAGE_CHARS = 100_000       # one message's text
MAX_MESSAGES = 1024
MAX_STOP_CHARS = 64
MAX_TOKENS_LIMIT = 4096           # the largest max_tokens a server allows; --max-tokens lowers it
DEFAULT_MAX_TOKENS = 256
# A top_p or temperature this close to 0 is served greedy, as it is in effect: top_p 0 keeps only the best
# token, and such a temperature makes the draw the argmax to float32 precision. Greedy is also exact: the
# sampler's own floor (sampling.MIN_TEMPERATURE, which only keeps the division finite) is far lower.
GREEDY_BELOW_TOP_P = 1e-6
GREEDY_BELOW_TEMPERATURE = 1e-3

Text = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
ReplyTokens = Annotated[Optional[int], Field(ge=1, json_schema_extra={"maximum": MAX_TOKENS_LIMIT})]


class APIError(Exception):
    """A mistake in a request (or a busy server), answered ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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


class Sampling(Body):
    """The fields both endpoints share: sampling, stops, streaming."""

    model: str | None = Field(default=None, max_length=256)
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    top_k: int = Field(default=0, ge=0, le=1_000_000, description="zaizai extension: keep the k most likely")
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100, description="zaizai extension; 1 = off")
    max_tokens: ReplyTokens = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Optional[Union[Stop, Annotated[list[Stop], Field(max_length=4)]]] = None
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="keep generating past the end of the reply "
                             "(as in vLLM; for benchmarks)")

    def check_token_cap(self, cap: int) -> None:
        """Refuse a reply budget over this server's ``--max-tokens``, worded as pydantic words a limit."""
        over = [name for name in ("max_tokens", "max_completion_tokens")
                if (getattr(self, name, None) or 0) > cap]
        if over:
            raise APIError(400, "; ".join(f"{name}: Input should be less than or equal to {cap}" for name in over),
                           param=over[0], code="invalid_value")

    def reply_tokens(self, cap: int) -> int:
        return min(cap, DEFAULT_MAX_TOKENS) if self.max_tokens is None else self.max_tokens

    def sampling(self, cap: int) -> SamplingConfig:
        greedy = self.top_p < GREEDY_BELOW_TOP_P or self.temperature < GREEDY_BELOW_TEMPERATURE
        return SamplingConfig(max_new_tokens=self.reply_tokens(cap), temperature=0.0 if greedy else self.temperature,
                              top_k=self.top_k, top_p=1.0 if greedy else self.top_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop strings may be at most {MAX_STOP_CHARS} characters", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: ReplyTokens = None

    def reply_tokens(self, cap: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().reply_tokens(cap)

    def conversation(self) -> list[dict]:
        """The messages as the renderer takes them ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


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
