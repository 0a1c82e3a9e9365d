"""A minimal HTTP/1.1 server for operators' probes and scrapes: one request per connection.

Owns the bytes on the wire: reading one request head, bounded (``MAX_REQUEST`` bytes within
``READ_TIMEOUT`` seconds, ``MAX_CONNECTIONS`` open at once), answering ``GET`` and ``HEAD``
from a table of routes, then closing (``Connection: close``): the response is followed by a
FIN, and whatever the client still sends is read and dropped until it closes too (at most
``LINGER`` seconds), so its unread bytes never turn the close into a reset that would destroy
the response. A malformed request gets 400, a head too large 431 (the rest is not
looked at), a slow one 408, an unknown path 404, another method 405; a body is never read.

Rule: it knows nothing of the proxy. A route is a plain function that answers from memory,
so a flood of probes costs a small object and a few microseconds each, and never touches a
client's or a server's connection. A route may instead return an awaitable (``/metrics`` with
workers asks the other workers, each within its timeout): the request is answered when it
completes, and it is cancelled if the client goes first.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, cast

from pgproxy.wire import log

__all__ = ["MAX_REQUEST", "HttpServer", "Response"]

MAX_REQUEST: Final = 8192  # bytes of request line and headers
READ_TIMEOUT: Final = 5.0  # seconds to send the whole head
LINGER: Final = 2.0  # seconds the client has to close after the response
MAX_CONNECTIONS: Final = 256  # open at once; more are closed unanswered
_TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_REQUEST_LINE: Final = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.[01]")
_HEADER: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*")
_END: Final = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT


Route = Callable[[], Response | Awaitable[Response]]


class HttpServer:
    """Serves ``routes`` (path -> answer) on one address until ``close``."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self.open: set[_Exchange] = set()  # connections open now
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        """Listen; ``reuse_port``: workers share the address (SO_REUSEPORT) as the proxy's."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Exchange(self), host, port, reuse_address=True, reuse_port=reuse_port
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for exchange in list(self.open):
                exchange.abort()
            await self._server.wait_closed()

    def answer(self, head: bytes) -> tuple[Response | Awaitable[Response], bool]:
        """The response to a request head (request line and headers, without the blank line),
        or what will make it, and whether the body goes with it (not for HEAD)."""
        lines = head.lstrip(b"\r\n").split(b"\n")
        request = _REQUEST_LINE.fullmatch(lines[0].rstrip(b"\r"))
        if request is None or not all(_HEADER.fullmatch(h.rstrip(b"\r")) for h in lines[1:]):
            return _plain(400, "bad request"), True
        method, target = request[1], request[2]
        route = self.routes.get(target.split(b"?", 1)[0].decode("ascii"))
        if route is None:
            return _plain(404, "not found"), method != b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return _plain(405, "only GET and HEAD"), True
        path = target.decode("ascii")
        try:
            response = route()
        except Exception:
            log.exception("operators' HTTP route %s failed", path)
            return _plain(500, "internal error"), method == b"GET"
        if not isinstance(response, Response):
            response = _completed(response, path)
        return response, method == b"GET"


async def _completed(response: Awaitable[Response], path: str) -> Response:
    try:
        return await response
    except Exception:
        log.exception("operators' HTTP route %s failed", path)
        return _plain(500, "internal error")


def _plain(status: int, text: str) -> Response:
    return Response(status, (text + "\n").encode())


def _encode(response: Response, with_body: bool) -> bytes:
    status = response.status
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"X-Pgproxy-Pid: {os.getpid()}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + (response.body if with_body else b"")


class _Exchange(asyncio.Protocol):
    """One connection: read the head, answer, close."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.scanned = 0  # how much of buf is known to hold no blank line
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        self.pending: asyncio.Task[None] | None = None  # a route's answer being made

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's are not asyncio.Transport subclasses
        if len(self.server.open) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self.server.open.add(self)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(
            READ_TIMEOUT, self._respond, _plain(408, "request timeout"), True
        )

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.answered or self.pending is not None:
            return  # answered (or being answered): dropped until the client closes
        self.buf += data
        end = _END.search(self.buf, self.scanned)
        if end is None or end.start() > MAX_REQUEST:
            if len(self.buf) > MAX_REQUEST:
                self._respond(_plain(431, "request too large"), True)
            self.scanned = max(0, len(self.buf) - 3)  # a blank line may straddle reads
            return
        response, with_body = self.server.answer(bytes(self.buf[: end.start()]))
        if isinstance(response, Response):
            self._respond(response, with_body)
            return
        if self.timer is not None:
            self.timer.cancel()  # the head came in time; the route bounds its own wait
        self.pending = asyncio.get_running_loop().create_task(self._later(response, with_body))

    async def _later(self, response: Awaitable[Response], with_body: bool) -> None:
        self._respond(await response, with_body)

    def eof_received(self) -> bool:
        return False  # the client is done (or gave up before a whole head): close

    def _respond(self, response: Response, with_body: bool) -> None:
        transport = self.transport
        if transport is None or self.answered:
            return
        self.answered = True
        self.buf = bytearray()
        transport.write(_encode(response, with_body))
        if self.timer is not None:
            self.timer.cancel()
        if not transport.can_write_eof():
            transport.close()  # after the write is flushed
            return
        transport.write_eof()  # after the response; the client closes its side in turn
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.pending is not None:
            self.pending.cancel()
        self.transport = None
        self.server.open.discard(self)
