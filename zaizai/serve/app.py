"""An OpenAI-compatible HTTP API and a chat page for a trained model: ``zaizai serve OUT_DIR``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also
streamed as server-sent events), ``GET /health``, the chat page at ``/`` and the OpenAPI schema at ``/openapi.json``
(no ``/docs`` page: Swagger UI would load from a CDN, and this server works offline).

Safe by default: it binds 127.0.0.1 and answers only requests addressed to a localhost name (``Host``; more with
``allowed_hosts``); with an API key (``ZAIZAI_API_KEY``, a key file or ``--api-key``) every ``/v1`` call needs
``Authorization: Bearer KEY``. Request bodies, messages and ``max_tokens`` are capped, slow request headers and
bodies are cut off, every response carries a Content-Security-Policy and no-framing headers, and every mistake in
a request is answered 4xx with an OpenAI-shaped error body ``{"error": {message, type, param, code}}``.

This module holds the routes and the error handlers; the request bodies are in :mod:`.schemas`, answering a
completion request in :mod:`.endpoints`, the generation worker (continuous batching: one decode step advances
every running generation, requests join and leave between steps; a bounded queue, 429 when it is full; a
disconnect frees its row before the next step; a generation whose scores become nan/inf fails alone, 500) in
:mod:`.scheduler`, and the Host allow-list, security headers and time limits in :mod:`.guards`.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..common.errors import ZaizaiError
from .endpoints import CHAT, COMPLETION, Server, answer
from .guards import ANY_ADDRESS, HostCheck, RequestBody, SecurityHeaders, allowed_names, content_security_policy, timed_h11
from .scheduler import Scheduler
from .schemas import MAX_TOKENS_LIMIT, APIError, ChatRequest, CompletionRequest, error_body

MAX_BODY_BYTES = 1 << 20          # a request body larger than 1 MiB is refused (413)
BODY_TIMEOUT_S = 10.0             # a request body not all in by then is refused (408)
HEADER_TIMEOUT_S = 10.0           # a connection whose request line and headers are not all in by then is closed
MAX_ACTIVE = 32                   # generations in the batch at once (one decode step advances them all)
API_KEY_ENV = "ZAIZAI_API_KEY"
WEB_DIR = Path(__file__).parent / "web"


class App(FastAPI):
    """FastAPI with :attr:`guards` outermost: around even its handler of unexpected errors (a 500 also carries
    the security headers)."""

    guards: list = []  # (middleware, keyword arguments), innermost first

    def build_middleware_stack(self):
        app = super().build_middleware_stack()
        for middleware, kwargs in self.guards:
            app = middleware(app, **kwargs)
        return app


def create_app(bot, *, api_key: str | None = None, model_name: str | None = None, max_tokens: int = MAX_TOKENS_LIMIT,
               max_active: int = MAX_ACTIVE, max_waiting: int = 64, max_body_bytes: int = MAX_BODY_BYTES,
               history: int | None = None, allowed_hosts: Iterable[str] | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving ``bot`` (a :class:`zaizai.inference.loaded.Zaizai`). ``history``: earlier exchanges a
    chat prompt keeps (None: as many as the model's training dialogues had). ``allowed_hosts``: names accepted in
    the ``Host`` header besides the localhost names (see :func:`.guards.allowed_names`)."""
    if history is not None and history < 0:
        raise ZaizaiError(f"--history must be >= 0 (earlier exchanges to keep), got {history}")
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ZaizaiError(f"--max-tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}")
    hosts = allowed_names(extra=allowed_hosts or ())
    model_name = model_name or f"zaizai-{Path(bot.path).parent.name or 'model'}"
    scheduler = Scheduler(bot, max_active=max_active, max_waiting=max_waiting)
    app = App(title="zaizai", version="1", description=__doc__.split("\n\n")[0], lifespan=lifespan,
              docs_url=None, redoc_url=None)  # their pages load from a CDN; /openapi.json stays
    app.state.server = Server(bot, scheduler, model_name, token_cap=max_tokens, api_key=api_key, history=history)
    app.state.scheduler = scheduler  # (a short name for its stats(), which /health reports)
    app.state.page = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    app.guards = [(RequestBody, {"limit": max_body_bytes, "timeout_s": body_timeout_s}),
                  (HostCheck, {"allowed": hosts}),
                  (SecurityHeaders, {"csp": content_security_policy(app.state.page)})]
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
async def page(request: Request):
    return HTMLResponse(request.app.state.page)  # (read once: the Content-Security-Policy has its script's hash)


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


# --- running the server ------------------------------------------------------------------------------------------


def read_api_key(api_key: str | None = None, api_key_file: str | Path | None = None) -> str | None:
    """The key every ``/v1`` call must send: ``api_key`` (the command line), else the first line of ``api_key_file``,
    else the environment variable ``ZAIZAI_API_KEY``; None when there is none."""
    if api_key is not None and api_key_file is not None:
        raise ZaizaiError("--api-key 和 --api-key-file 只能给一个 · give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ZaizaiError(f"读不了密钥文件 cannot read the API key file {str(api_key_file)!r}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise ZaizaiError(f"密钥文件是空的 the API key file {str(api_key_file)!r} is empty: "
                              "put the key on its first line")
        return key
    if api_key is not None:
        if not api_key.strip():
            raise ZaizaiError("--api-key 是空的 · --api-key is empty")
        return api_key.strip()
    return os.environ.get(API_KEY_ENV, "").strip() or None


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000, header_timeout_s: float = HEADER_TIMEOUT_S,
                  **kwargs):
    """uvicorn's configuration for ``app``: HTTP/1.1 by h11 with a time limit on request headers
    (:func:`.guards.timed_h11`), idle keep-alive connections closed after 5 s."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=timed_h11(header_timeout_s), timeout_keep_alive=5,
                          log_level="warning", **kwargs)


def off_main_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a thread of its own that ends with it (its exception raised here).

    Why: the generation thread should be the only one that has run torch's parallel (OpenMP) operations. Once
    two threads have, GNU OpenMP keeps a team for each and, with more threads than cores, stops spinning between
    parallel regions: each small operation of a decode step then waits to wake a sleeping thread. Measured on
    2 cores (6L/384d, one row): a decode step in the generation thread took 7.5 ms after the model loaded in the
    main thread, 5.0 ms when it loaded in a thread that had ended."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            result["error"] = e

    thread = threading.Thread(target=run, name="zaizai-load")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def serve(out_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          api_key_file: str | None = None, allowed_hosts: list[str] | None = None, which: str = "auto",
          device: str = "auto", max_tokens: int = MAX_TOKENS_LIMIT, max_active: int = MAX_ACTIVE, max_waiting: int = 64,
          history: int | None = None, header_timeout_s: float = HEADER_TIMEOUT_S,
          body_timeout_s: float = BODY_TIMEOUT_S, compile: bool = False, weights: str = "float32") -> None:
    """Load the model in ``out_dir`` and serve it until interrupted (see the module docstring). ``allowed_hosts``:
    names accepted in the ``Host`` header besides the localhost names and ``host`` itself. ``compile``: a lone
    generation steps through a compiled decode step, compiled before the server listens (``zaizai serve --compile``);
    ``weights``: its weights' type (see :meth:`~zaizai.inference.loaded.Zaizai.compile_decoding`)."""
    try:
        import uvicorn
    except ImportError:
        raise ZaizaiError("serving needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    from ..inference.loaded import check_weights, load

    check_weights(compile, weights)
    key = read_api_key(api_key, api_key_file)
    hosts = allowed_names(host, allowed_hosts or ())  # (a wrong --allowed-host is told before the model loads)
    bot = off_main_thread(load, out_dir, which=which, device=device)
    if compile:  # before listening, off the main thread too (see off_main_thread)
        off_main_thread(bot.compile_decoding, say=sys.stdout, weights=weights)
    app = create_app(bot, api_key=key, max_tokens=max_tokens, max_active=max_active, max_waiting=max_waiting,
                     history=history, allowed_hosts=hosts, body_timeout_s=body_timeout_s)
    shown = f"[{host}]" if ":" in host else host
    print(f"崽崽 zaizai · {bot}\n聊天页面 chat page: http://{shown}:{port}/   API: http://{shown}:{port}/v1   "
          f"OpenAPI: http://{shown}:{port}/openapi.json")
    if key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"注意 note: serving on {host} without an API key: anyone who can reach it can use it "
              f"(set {API_KEY_ENV} or --api-key-file)")
    if api_key is not None:
        print(f"注意 note: --api-key 会出现在进程列表里 · a key on the command line shows in `ps`: "
              f"prefer the environment variable {API_KEY_ENV} or --api-key-file FILE")
    if host.strip("[]") in ANY_ADDRESS and not allowed_hosts:
        print("注意 note: 只接受用 localhost / 127.0.0.1 访问；别的机器用名字或 IP 访问时请加 --allowed-host 名字 · "
              "only requests to localhost names are answered: add --allowed-host NAME for the name or address "
              "other machines use")
    uvicorn.Server(server_config(app, host=host, port=port, header_timeout_s=header_timeout_s)).run()
