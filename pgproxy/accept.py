"""The TCP listening sockets and their accept path, where a client's TLS begins.

Owns binding (every address the listen host resolves to, SO_REUSEADDR, SO_REUSEPORT for
workers and ``so_reuseport``, IPv6 only on IPv6 sockets, one port for all when it is 0), the
accept loop and the hand-off of each accepted socket to the event loop as a client session.
When client TLS is configured, the first byte a client sends decides how its socket is
handed over, read with ``MSG_PEEK`` so that it stays in the kernel: 0x16 (a TLS handshake
record, PostgreSQL 17's ``sslnegotiation=direct``) goes to uvloop's native TLS from the first
byte; anything else (a startup packet, SSLRequest, CancelRequest) as plaintext, as before.
asyncio's ``start_tls`` cannot take bytes already read, which is why this happens before the
transport exists.

Rules that keep it honest:
* One readiness event accepts at most ``ACCEPT_BATCH`` connections: a storm of connects
  cannot hold the loop from the clients already logged in (the kernel keeps the rest queued,
  and the next loop turn takes the next batch).
* A client that sends nothing costs no more than ``client_login_timeout`` and blocks nothing:
  its wait is a reader callback and a timer, then the same FATAL 57014 a login timeout sends.
* Without client TLS nothing is peeked: the socket goes to the loop at once.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Final

from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import fatal
from pgproxy.wire import log

# Connections accepted per readiness event of a listening socket (asyncio's own loop takes
# up to its backlog, 100 by default; libuv takes all there are).
ACCEPT_BATCH: Final = 32
BACKLOG: Final = 4096
# accept() failing (out of file descriptors: EMFILE): wait this long before trying again
# (as asyncio), rather than be woken at once for the same error, again and again.
_RESOURCE_PAUSE_S: Final = 1.0


def bind_tcp(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address ``host`` resolves to ("": all)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            where = (*address[:1], port, *address[2:])
            try:
                sock.bind(where)
            except OSError as exc:
                message = f"error while attempting to bind on address {where!r}: {exc.strerror}"
                raise OSError(exc.errno, message) from None
            port = sock.getsockname()[1]  # port 0: the one chosen, for the other addresses too
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class TcpListener:
    """Accepts clients on ``sockets`` and hands each to the loop as a ``factory()`` protocol.

    ``tls()`` is the client TLS context now (None: not configured; a reload may change it),
    ``login_timeout()`` the seconds a client may take to log in (0: no limit), and ``spawn``
    runs a coroutine as a task the proxy cancels when it stops."""

    def __init__(
        self,
        sockets: list[socket.socket],
        factory: Callable[[], asyncio.Protocol],
        tls: Callable[[], ssl.SSLContext | None],
        login_timeout: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.sockets = sockets
        self._factory = factory
        self._tls = tls
        self._login_timeout = login_timeout
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()
        # Accepted sockets whose first byte is awaited: fd -> (socket, its deadline timer).
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle | None]] = {}
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop listening (with SO_REUSEPORT the kernel sends new connections to the other
        sockets on the port); clients accepted already carry on."""
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def abort_waiting(self) -> None:
        """Close the accepted sockets still waiting for their first byte (the proxy stops)."""
        for fd in list(self._waiting):
            self._forget(fd).close()

    # --- accepting ---------------------------------------------------------------------------

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # reset before we took it
            except OSError as exc:  # out of file descriptors, or worse: pause, never spin
                log.error("cannot accept connections: %s; trying again in %.0f s",
                          exc, _RESOURCE_PAUSE_S)  # fmt: skip
                self._loop.remove_reader(listening.fileno())
                self._loop.call_later(_RESOURCE_PAUSE_S, self._resume, listening)
                return
            sock.setblocking(False)
            ctx = self._tls()
            if ctx is None:
                self._hand_off(sock, None)  # no TLS to begin: the login refuses a ClientHello
            else:
                self._peek(sock, ctx)

    def _resume(self, listening: socket.socket) -> None:
        if listening.fileno() >= 0:  # not closed meanwhile (drain, stop)
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    # --- the first byte ----------------------------------------------------------------------

    def _peek(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        """Hand ``sock`` over as its first byte says, now if it has come, else once it does."""
        fd = sock.fileno()
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            if fd in self._waiting:
                return  # still waiting (a spurious wake-up)
            timeout = self._login_timeout()
            timer = self._loop.call_later(timeout, self._expire, fd) if timeout else None
            self._waiting[fd] = (sock, timer)
            self._loop.add_reader(fd, self._readable, fd, ctx)
            return
        except OSError:
            first = b""  # reset: nothing to serve
        if fd in self._waiting:
            self._forget(fd)
        if not first:
            sock.close()  # closed before a word
        elif first[0] == m.TLS_HANDSHAKE_RECORD:
            self._hand_off(sock, ctx)
        else:
            self._hand_off(sock, None)

    def _readable(self, fd: int, ctx: ssl.SSLContext) -> None:
        waiting = self._waiting.get(fd)
        if waiting is not None:
            self._peek(waiting[0], ctx)

    def _forget(self, fd: int) -> socket.socket:
        sock, timer = self._waiting.pop(fd)
        self._loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()
        return sock

    def _expire(self, fd: int) -> None:
        """Silent for the whole login timeout: what a login timeout says, then close."""
        sock = self._forget(fd)
        error = fatal(errors.QUERY_CANCELED, "canceling authentication due to timeout")
        try:
            sock.send(m.error_response(error.fields()))  # a few bytes into an empty buffer
        except OSError:
            pass
        sock.close()

    # --- the hand-off ------------------------------------------------------------------------

    def _hand_off(self, sock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        self._spawn(self._connect(sock, ctx))

    async def _connect(self, sock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        """The loop's transport for ``sock``: plaintext, or TLS from the first byte (the
        handshake is uvloop's; the session starts once it is done, and checks ALPN)."""
        loop = self._loop
        try:
            if ctx is None:
                await loop.connect_accepted_socket(self._factory, sock)
            else:
                timeout = self._login_timeout() or None
                await loop.connect_accepted_socket(
                    self._factory, sock, ssl=ctx, ssl_handshake_timeout=timeout
                )
        except OSError as exc:  # ssl.SSLError and the handshake timeout among them
            # uvloop closes the socket with its transport; an early failure leaves it to us.
            if sock.fileno() >= 0:
                sock.close()
            log.info("%s failed: %s", "direct TLS handshake" if ctx else "accepting", exc)
