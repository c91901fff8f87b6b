"""The server's outer layer: who may ask, how many bytes and how many seconds a request may take to arrive.

Design choices:
- `Guard` is plain ASGI, not an HTTP middleware: the routes get the client's own `receive` channel after the
  body, so a client that disconnects is seen at once whether its response streams or not.
- Order of checks, cheapest and least trusting first: the Host header (DNS rebinding), the API key (compared in
  constant time), then the body, read here whatever its transfer encoding, counted as it arrives and refused
  (413) at the first byte past the limit, under a deadline (408). The routes get the body as one message.
- A refusal sent before the body has been read whole says `Connection: close`, so the connection is closed
  and the rest of the body is never read.
- `guarded_h11` is uvicorn's h11 protocol with a deadline on a request's headers (from the connection's start
  or the request's first byte): partial headers and silent connections are closed after `read_timeout`.
- Nothing here touches tensors or the model.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from secrets import compare_digest
from typing import Any, Awaitable, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServerSettings

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> bytes:
    """OpenAI's error shape, as ASCII JSON (safe whatever the message holds)."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code, "param": param}}).encode()


async def send_error(send: Send, status: int, message: str, kind: str = "invalid_request_error",
                     code: str | None = None, headers: dict[str, str] | None = None, close: bool = False) -> None:
    body = error_body(message, kind, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def normal_host(value: str) -> str:
    """'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1', 'example.com.' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    host = normal_host(host)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostAllowList:
    """The Host header names a server answers: `allowed_hosts` if given (`*`: any), else loopback names when
    bound to loopback (a browser tricked by DNS rebinding sends the attacker's name), else any."""

    def __init__(self, settings: ServerSettings):
        names = {normal_host(n) for n in settings.allowed_hosts.split(",") if n.strip()}
        self.any = "*" in names or (not names and not is_loopback(settings.host))
        self.loopback = not names and not self.any
        self.names = frozenset(names)

    def __call__(self, host: str | None) -> bool:
        if self.any or host is None:  # no Host at all: HTTP/1.0 from a script, not a browser
            return True
        name = normal_host(host)
        return name in self.names or (self.loopback and is_loopback(name))


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class Guard:
    """ASGI middleware: Host allow-list, API key, bounded body read; a bug below answers 500, never a traceback."""

    def __init__(self, app: Callable, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.hosts = HostAllowList(settings)
        self.key = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            # A refusal before the body is read closes the connection: the body is never read.
            has_body = header(scope, b"content-length") not in (None, b"0") or bool(header(scope, b"transfer-encoding"))
            host = header(scope, b"host")
            if not self.hosts(host.decode("latin-1") if host is not None else None):
                await send_error(send, 400, "this server does not answer for that Host header (see --allowed-hosts)",
                                 code="host_not_allowed", close=True)
                return
            if self.key is not None and scope["path"].startswith("/v1/"):
                given = header(scope, b"authorization") or b""
                if not compare_digest(given, self.key):
                    await send_error(send, 401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                                     "authentication_error", "invalid_api_key", close=has_body)
                    return
            if has_body:  # read here, whatever the route: no route answers while a body is still arriving
                body = await self.read_body(scope, receive, send)
                if body is None:
                    return  # refused, or the client left
                receive = replay(body, receive)
            await self.app(scope, receive, tracked)
        except Exception:  # a bug must not take the server down or leave a client without an answer
            logger.exception("request failed")
            if not started:
                await send_error(send, 500, "internal error", "server_error", "internal_error", close=True)

    async def read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413/408 (or when the client has gone)."""
        limit = self.settings.max_body_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            await send_error(send, 413, f"the request body exceeds {limit} bytes", code="body_too_large",
                             close=True)
            return None
        deadline = asyncio.get_running_loop().time() + self.settings.read_timeout
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await send_error(send, 408, f"the request body did not arrive within {self.settings.read_timeout:g} "
                                            "seconds", code="request_timeout", close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, 413, f"the request body exceeds {limit} bytes", code="body_too_large",
                                 close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that gives the body already read, then the client's own messages (its disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s")


def guarded_h11(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus a deadline on each request's headers: `read_timeout` seconds from the
    connection's start or from the first byte of a request on a kept-alive connection (idle time between
    requests is uvicorn's `timeout_keep_alive`)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.headers_timer: asyncio.TimerHandle | None = None
            self._arm_headers_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_headers_timer()  # a request has begun; its headers are not complete yet
            else:
                self._disarm_headers_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Between requests uvicorn's keep-alive timer runs; a pipelined request may have begun already.
            if self.conn.their_state is not h11.IDLE:
                self._disarm_headers_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_headers_timer()
            super().connection_lost(exc)

        def _arm_headers_timer(self) -> None:
            if getattr(self, "headers_timer", None) is None:
                self.headers_timer = self.loop.call_later(read_timeout, self._headers_late)

        def _disarm_headers_timer(self) -> None:
            if getattr(self, "headers_timer", None) is not None:
                self.headers_timer.cancel()
                self.headers_timer = None

        def _headers_late(self) -> None:
            self.headers_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                body = error_body(f"the request headers did not arrive within {read_timeout:g} seconds",
                                  code="request_timeout")
                if self.conn.our_state is h11.IDLE:  # nothing sent on this request yet: say why
                    self.transport.write(TIMEOUT_RESPONSE % (len(body), body))
                self.transport.close()

    return GuardedH11Protocol
