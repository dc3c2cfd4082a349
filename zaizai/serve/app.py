"""An OpenAI-compatible HTTP API and a chat page for a trained model: ``zaizai serve OUT_DIR``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also
streamed as server-sent events), ``GET /health``, the chat page at ``/`` and the OpenAPI schema at ``/openapi.json``
(no ``/docs`` page: Swagger UI would load from a CDN, and this server works offline).

Safe by default: it binds 127.0.0.1; with an API key (``--api-key`` or ``ZAIZAI_API_KEY``) every ``/v1``
call needs ``Authorization: Bearer KEY``. Request bodies, messages and ``max_tokens`` are capped, and every
mistake in a request is answered 4xx with an OpenAI-shaped error body ``{"error": {message, type, param, code}}``.

This module holds the routes and the error handlers; the request bodies are in :mod:`.schemas`, answering a
completion request in :mod:`.endpoints`, and the generation worker (generations interleaved token by token,
a bounded queue, 429 when it is full, a disconnect stops its generation) in :mod:`.scheduler`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..common.errors import ZaizaiError
from .endpoints import CHAT, COMPLETION, Server, answer
from .scheduler import Scheduler
from .schemas import MAX_TOKENS_LIMIT, APIError, ChatRequest, CompletionRequest, error_body

MAX_BODY_BYTES = 1 << 20          # a request body larger than 1 MiB is refused (413)
API_KEY_ENV = "ZAIZAI_API_KEY"
WEB_DIR = Path(__file__).parent / "web"


def create_app(bot, *, api_key: str | None = None, model_name: str | None = None, max_tokens: int = MAX_TOKENS_LIMIT,
               max_active: int = 4, max_waiting: int = 64, max_body_bytes: int = MAX_BODY_BYTES,
               history: int | None = None) -> FastAPI:
    """The FastAPI app serving ``bot`` (a :class:`zaizai.inference.loaded.Zaizai`). ``history``: earlier exchanges a
    chat prompt keeps (None: as many as the model's training dialogues had)."""
    if history is not None and history < 0:
        raise ZaizaiError(f"--history must be >= 0 (earlier exchanges to keep), got {history}")
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ZaizaiError(f"--max-tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}")
    model_name = model_name or f"zaizai-{Path(bot.path).parent.name or 'model'}"
    scheduler = Scheduler(max_active=max_active, max_waiting=max_waiting)
    app = FastAPI(title="zaizai", version="1", description=__doc__.split("\n\n")[0], lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # their pages load from a CDN; /openapi.json stays
    app.state.server = Server(bot, scheduler, model_name, token_cap=max_tokens, api_key=api_key, history=history)
    app.state.scheduler = scheduler  # (a short name for its stats(), which /health reports)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.server.scheduler.close()  # ends the worker thread


# --- errors: every one answered in OpenAI's shape ----------------------------------------------------------------


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


async def api_error(request, e: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return error_response(e.status, e.message, e.type, e.param, e.code, headers)


async def invalid_request(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                        f"{err.get('msg', 'invalid')}" for err in errors[:5])
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
    return error_response(400, message or "invalid request", param=param, code=code)


async def http_error(request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))


async def unexpected_error(request, e: Exception):  # a bug: still answered in the API's shape
    return error_response(500, f"internal error: {type(e).__name__}", "server_error")


ERROR_HANDLERS = {APIError: api_error, RequestValidationError: invalid_request, StarletteHTTPException: http_error,
                  Exception: unexpected_error}


# --- routes ------------------------------------------------------------------------------------------------------


def check_key(request: Request) -> None:
    api_key = request.app.state.server.api_key
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


router = APIRouter()
API = [Depends(check_key)]


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse((WEB_DIR / "index.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request) -> dict:
    server: Server = request.app.state.server
    return {"status": "ok", "model": server.model_name, "chat_model": server.bot.is_chat_model,
            "block_size": server.block_size, "auth": server.api_key is not None, **server.scheduler.stats()}


@router.get("/v1/models", dependencies=API)
async def models(request: Request) -> dict:
    server: Server = request.app.state.server
    path = Path(server.bot.path)
    created = int(path.stat().st_mtime) if path.exists() else 0
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": created,
                                        "owned_by": "zaizai", "chat": server.bot.is_chat_model,
                                        "context_length": server.block_size}]}


@router.post("/v1/chat/completions", dependencies=API)
async def chat_completions(body: ChatRequest, request: Request):
    return await answer(CHAT, body, request.app.state.server, request)


@router.post("/v1/completions", dependencies=API)
async def completions(body: CompletionRequest, request: Request):
    return await answer(COMPLETION, body, request.app.state.server, request)


# --- the body limit and running the server -----------------------------------------------------------------------


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
                    raise StarletteHTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"request body over {self.limit} bytes", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def serve(out_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          which: str = "auto", device: str = "auto", max_tokens: int = MAX_TOKENS_LIMIT, max_active: int = 4,
          max_waiting: int = 64, history: int | None = None) -> None:
    """Load the model in ``out_dir`` and serve it until interrupted (see the module docstring)."""
    try:
        import uvicorn
    except ImportError:
        raise ZaizaiError("serving needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    from ..inference.loaded import load

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    bot = load(out_dir, which=which, device=device)
    app = create_app(bot, api_key=api_key, max_tokens=max_tokens, max_active=max_active, max_waiting=max_waiting,
                     history=history)
    shown = f"[{host}]" if ":" in host else host
    print(f"崽崽 zaizai · {bot}\n聊天页面 chat page: http://{shown}:{port}/   API: http://{shown}:{port}/v1   "
          f"OpenAPI: http://{shown}:{port}/openapi.json")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"注意 note: serving on {host} without an API key: anyone who can reach it can use it "
              f"(set --api-key or {API_KEY_ENV})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
