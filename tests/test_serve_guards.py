"""The server's guards: the Host allow-list (DNS rebinding), security headers, time limits on request headers and
bodies (real sockets against a real uvicorn server), and the API key from the environment or a file. No trained
model: a stand-in bot is enough for everything here but generation."""

import base64
import hashlib
import re
import socket
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from test_server import LiveServer  # noqa: E402
from zaizai.common.errors import ZaizaiError  # noqa: E402
from zaizai.serve.app import API_KEY_ENV, WEB_DIR, create_app, read_api_key  # noqa: E402
from zaizai.serve.guards import LOCAL_NAMES, allowed_names, host_name  # noqa: E402

STUB = SimpleNamespace(path="m/last.safetensors", is_chat_model=True, model_config=SimpleNamespace(block_size=32))


@pytest.fixture
def app():
    app = create_app(STUB)
    yield app
    app.state.scheduler.close()


def get(app, path, host, **kwargs):
    with TestClient(app, raise_server_exceptions=False) as client:
        return client.get(path, headers={"Host": host}, **kwargs)


# --- the Host allow-list ------------------------------------------------------------------------------------------


def test_host_names_are_parsed_without_their_port():
    assert host_name("127.0.0.1:8000") == "127.0.0.1" and host_name("LocalHost.") == "localhost"
    assert host_name("[::1]:8000") == "::1" == host_name("[::1]") == host_name("::1")
    assert host_name("chat.example:443") == "chat.example"
    for bad in ("", ":80", "a:b", "[::1", "[::1]x", "evil.example@127.0.0.1", "a b", "a/b"):
        assert host_name(bad) is None, bad


def test_only_localhost_names_are_answered_by_default(app):
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1234", "[::1]:8000", "127.0.0.1"):
        assert get(app, "/health", host).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example", "",
                 "192.168.1.5:8000"):
        api = get(app, "/v1/models", host)
        assert api.status_code == 400, host
        error = api.json()["error"]
        assert error["code"] == "invalid_host" and "--allowed-host" in error["message"]
        page = get(app, "/", host)
        assert page.status_code == 400 and page.headers["content-type"].startswith("text/plain")
        assert "--allowed-host" in page.text and "<" not in page.text.split("'")[0]


def test_allowed_hosts_add_names_and_star_allows_any():
    app = create_app(STUB, allowed_hosts=["chat.example", "*.lan", "10.0.0.7:8000"])
    try:
        for host in ("chat.example:8000", "Chat.Example", "pc.lan", "a.b.lan:80", "10.0.0.7", "localhost:1"):
            assert get(app, "/health", host).status_code == 200, host
        for host in ("lan", "evil.example", "chat.example.evil", "10.0.0.8"):
            assert get(app, "/health", host).status_code == 400, host
    finally:
        app.state.scheduler.close()
    anyone = create_app(STUB, allowed_hosts=["*"])
    try:
        assert get(anyone, "/health", "whatever.example:1").status_code == 200
    finally:
        anyone.state.scheduler.close()


def test_the_bound_address_is_allowed_when_it_is_one_address():
    assert allowed_names("0.0.0.0") == allowed_names("::") == list(LOCAL_NAMES)
    assert allowed_names("192.168.1.5")[-1] == "192.168.1.5"
    assert allowed_names(None, ["a.example", "*.b.example", "*"])[-3:] == ["a.example", "*.b.example", "*"]
    for bad in ("", "a/b", "*x", "**.example", "a b"):
        with pytest.raises(ZaizaiError, match="--allowed-host"):
            allowed_names(None, [bad])


# --- security headers ---------------------------------------------------------------------------------------------


def sha256_source(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def test_every_response_carries_the_security_headers(app):
    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    page = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.DOTALL).group(1)
    responses = {"page": get(app, "/", "127.0.0.1"), "api": get(app, "/v1/models", "127.0.0.1"),
                 "404": get(app, "/v1/nothing", "127.0.0.1"), "bad host": get(app, "/", "evil.example"),
                 "500": get(app, "/boom", "127.0.0.1")}
    with TestClient(app) as client:
        responses["413"] = client.post("/v1/completions", content=b"x" * (2 << 20), headers={"Host": "127.0.0.1"})
    assert [r.status_code for r in responses.values()] == [200, 200, 404, 400, 500, 413]
    for name, r in responses.items():
        assert r.headers["x-frame-options"] == "DENY", name
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["referrer-policy"] == "no-referrer", name
        csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'self'" and csp["frame-ancestors"] == "'none'", name
        # the page's own inline script and style, by hash, and nothing else inline
        assert csp["script-src"] == sha256_source(script) and csp["style-src"] == sha256_source(style), name


def test_a_body_without_a_length_is_still_capped(app):
    def pieces():   # chunked: no Content-Length to refuse it by
        for _ in range(40):
            yield b"x" * (64 << 10)

    with TestClient(app) as client:
        r = client.post("/v1/completions", content=pieces(), headers={"Host": "127.0.0.1"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# --- slow clients: real sockets against a real uvicorn server -----------------------------------------------------


@pytest.fixture
def quick_server():
    """A server that gives request headers 0.5 s and request bodies 0.5 s."""
    server = LiveServer(create_app(STUB, body_timeout_s=0.5), header_timeout_s=0.5)
    yield server
    server.server.should_exit = True
    server.thread.join(timeout=10)
    server.app.state.scheduler.close()


def until_closed(sock: socket.socket, wait_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``wait_s``."""
    sock.settimeout(wait_s)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except socket.timeout:
        pytest.fail(f"the server held the connection for {wait_s} s (got {received!r})")
    return received


def test_a_connection_that_sends_half_a_header_is_closed(quick_server):
    with socket.create_connection(("127.0.0.1", quick_server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # (no blank line: the headers go on)
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", quick_server.port)) as sock:   # one that sends nothing at all
        assert until_closed(sock) == b""


def test_the_next_request_on_a_kept_alive_connection_has_the_same_limit(quick_server):
    with socket.create_connection(("127.0.0.1", quick_server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while b'"status":"ok"' not in first:   # (the headers and the body may come apart)
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_trickles_is_cut_off_with_408(quick_server):
    with socket.create_connection(("127.0.0.1", quick_server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\": ")
        answer = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
    assert b"connection: close" in answer.lower()


def test_a_whole_request_in_pieces_within_the_limits_is_answered(quick_server):
    with socket.create_connection(("127.0.0.1", quick_server.port)) as sock:
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Connection: close\r\n\r\n"):
            sock.sendall(piece)
        assert until_closed(sock).startswith(b"HTTP/1.1 200 ")


# --- the API key --------------------------------------------------------------------------------------------------


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert read_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, " from-env\n")
    assert read_api_key() == "from-env"
    assert read_api_key("from-flag") == "from-flag"   # the command line still works, and wins
    key_file = tmp_path / "key.txt"
    key_file.write_text("  from-file  \nsecond line\n", encoding="utf-8")
    assert read_api_key(api_key_file=str(key_file)) == "from-file"
    key_file.write_text("\n", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="empty"):
        read_api_key(api_key_file=str(key_file))
    with pytest.raises(ZaizaiError, match="cannot read the API key file"):
        read_api_key(api_key_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ZaizaiError, match="cannot read the API key file"):
        read_api_key(api_key_file=str(tmp_path))   # a folder
    with pytest.raises(ZaizaiError, match="not both"):
        read_api_key("k", api_key_file=str(key_file))
