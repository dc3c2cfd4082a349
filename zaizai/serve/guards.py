"""What stands between the network and the app: the Host allow-list, security headers, the request body (size
and time limits) and the time a connection may take to send its request line and headers.

- :class:`HostCheck`: a request whose ``Host`` header is not an allowed name is answered 400 (DNS rebinding: a web
  page on another site that resolves its own name to 127.0.0.1 must not reach a keyless local server). Allowed by
  default: the localhost names (:data:`LOCAL_NAMES`), any port; more with ``allowed_hosts`` (``"*"``: any).
- :class:`SecurityHeaders`: every response says ``Content-Security-Policy`` (the chat page is self-contained: only
  its own inline script and style, by hash), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
  ``Referrer-Policy: no-referrer``.
- :class:`RequestBody`: the whole body is read before the app sees it, within ``timeout_s`` (408 after) and
  ``limit`` bytes (413 over).
- :func:`timed_h11`: uvicorn's h11 protocol, closing a connection whose request line and headers are not all in
  within a time limit (uvicorn has no such limit: a client that sends half a header would hold its connection).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import Iterable

from ..common.errors import ZaizaiError
from .schemas import error_body

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")  # a bound --host that is not one address


# --- the Host allow-list -----------------------------------------------------------------------------------------


def host_name(value: str) -> str | None:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``, ``Example.COM.:80`` ->
    ``example.com``; None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # [IPv6]:port
        name, bracket, port = value[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
    elif value.count(":") == 1:  # name:port
        name, port = value.split(":")
        if not port.isdigit():
            return None
    else:  # a name, or a bare IPv6 address
        name = value
    name = name.rstrip(".") if name != "." else ""
    if not name or any(c.isspace() or c in "/\\@?#[]" for c in name):
        return None
    return name


def allowed_names(bound_host: str | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The names a server accepts in ``Host``: the localhost names, ``bound_host`` when it is one address (not
    0.0.0.0 or ::), and ``extra`` (``--allowed-host``: a name, ``*.example.com`` for its subdomains, ``*`` for any)."""
    names = list(LOCAL_NAMES)
    if bound_host is not None and bound_host.strip("[]") not in ANY_ADDRESS:
        names.append(bound_host)
    for entry in extra:
        if entry.strip() == "*":
            names.append("*")
            continue
        wildcard = entry.strip().startswith("*.")
        name = host_name(entry.strip()[2:] if wildcard else entry)
        if name is None or "*" in name:
            raise ZaizaiError(f"--allowed-host {entry!r} 不是主机名 · is not a host name "
                              "(give a name or an address, '*.example.com' for its subdomains, or '*' for any)")
        names.append("*." + name if wildcard else name)
    return names


class HostCheck:
    """ASGI middleware: a request whose ``Host`` header is not an allowed name is answered 400 (OpenAI's error
    shape under ``/v1``, plain text elsewhere)."""

    def __init__(self, app, allowed: Iterable[str] = LOCAL_NAMES):
        self.app = app
        allowed = [a.lower() for a in allowed]
        self.any = "*" in allowed
        self.suffixes = tuple(a[1:] for a in allowed if a.startswith("*."))  # ".example.com"
        self.names = {host_name(a) for a in allowed if not a.startswith("*")} - {None}

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return self.any or (name is not None and (name in self.names or name.endswith(self.suffixes)))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.allows(host):
            return await self.app(scope, receive, send)
        shown = host if len(host) <= 100 else host[:100] + "…"
        message = (f"Host 头 {shown!r} 不被允许（防 DNS 重绑定）· the Host header {shown!r} is not allowed "
                   "(DNS rebinding protection): open the server by 127.0.0.1 or localhost, or start it with "
                   "--allowed-host NAME")
        if scope["type"] == "http":
            if scope.get("path", "").startswith("/v1"):
                await respond(send, 400, error_body(message, code="invalid_host"))
            else:
                await respond(send, 400, message)


async def respond(send, status: int, body: dict | str, close: bool = False) -> None:
    """Send a whole response: JSON for a dict, plain text for a string."""
    if isinstance(body, dict):
        data, kind = json.dumps(body, ensure_ascii=False).encode(), b"application/json"
    else:
        data, kind = body.encode(), b"text/plain; charset=utf-8"
    headers = [(b"content-type", kind), (b"content-length", str(len(data)).encode())]
    if close:  # the rest of the request is not read: end the connection after this answer
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# --- security headers --------------------------------------------------------------------------------------------


def inline_hashes(page: str, tag: str) -> list[str]:
    """CSP sources allowing each inline ``<tag>`` element of ``page`` (one without attributes) by its hash."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'" for text in found]


def content_security_policy(page: str) -> str:
    """The policy for ``page`` (and every other response): its own origin, its own inline script and style by hash,
    no frames, no plugins, no base or form elsewhere."""
    scripts = " ".join(inline_hashes(page, "script")) or "'none'"
    styles = " ".join(inline_hashes(page, "style")) or "'none'"
    return (f"default-src 'self'; script-src {scripts}; style-src {styles}; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (those the app set itself are kept)."""

    def __init__(self, app, csp: str):
        self.app = app
        self.headers = [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
                        (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                message = {**message, "headers": headers + [h for h in self.headers if h[0] not in present]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- the request body --------------------------------------------------------------------------------------------


class RequestBody:
    """ASGI middleware: reads a request's whole body before the app sees it: more than ``limit`` bytes is answered
    413 (by its Content-Length, or as it arrives), a body not all in within ``timeout_s`` of the request 408 (a
    client that trickles its body would hold the connection); both close the connection."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.too_large(send)
        try:
            body = await asyncio.wait_for(self.read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            return await respond(send, 408, error_body(f"the request body did not arrive within {self.timeout_s:g} s",
                                                       code="request_timeout"), close=True)
        except OverflowError:
            return await self.too_large(send)
        if body is None:
            return  # the client left before its body was in
        replayed = False

        async def replay():  # the body once, then what the server says (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise OverflowError
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def too_large(self, send):
        await respond(send, 413, error_body(f"request body over {self.limit} bytes", code="request_too_large"),
                      close=True)


# --- the request line and headers --------------------------------------------------------------------------------


def timed_h11(header_timeout_s: float):
    """uvicorn's h11 protocol class, closing a connection that does not send a whole request line and headers
    within ``header_timeout_s`` of connecting or of starting its next request (answered 408 when some of it came)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        partial = False  # some bytes of the awaited request came

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # (bytes of the next request)
                self.partial = self.partial or bool(data)
                if self.header_timer is None:
                    self.arm()
            super().data_received(data)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request line and its headers are in
                self.disarm()

        def arm(self) -> None:
            self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            self.partial = False

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return
            if self.partial:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                     b"content-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    TimedH11Protocol.__name__ = TimedH11Protocol.__qualname__ = "TimedH11Protocol"
    return TimedH11Protocol
