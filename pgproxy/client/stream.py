"""The client's input state machine: every byte a logged-in client sends passes through here.

Theory of operation. A session is in exactly one ``mode``:

* **LOGIN**: startup and authentication (:mod:`pgproxy.client.login`); input is buffered by
  :class:`~pgproxy.wire.WireProtocol` and read by the login coroutine.
* **UNLINKED**: the client owes nothing and holds no server. A message that needs a server
  links an idle one or starts waiting; a lone Sync is answered here (there is nothing to
  synchronise), a lone Flush is a no-op; the LISTEN fast path answers without a server.
* **WAITING**: a server (or a listener's upstream LISTEN) is awaited; further bytes are
  buffered in ``_inbuf`` (bounded: past ``_INBUF_PAUSE`` the client stops being read).
* **LINKED**: messages are walked header by header and forwarded in runs to ``server``; its
  :class:`~pgproxy.protocol.flow.ServerFlow` counts what the server owes. In transaction mode
  the server calls ``server_released()`` when it owes nothing and no transaction is open; in
  session mode the link lasts until the client leaves.
* **SKIPPING**: an error the proxy made up (no server could be had, the server died, a cancel
  hit a queued request) ended the current unit; as Postgres after an extended-protocol error,
  messages are dropped up to the next Sync, which is answered with ReadyForQuery.
* **ADMIN**: logged in to the admin console (database ``pgbouncer``/``pgproxy``): every read
  goes to its :class:`~pgproxy.admin.console.Console`, which answers; no pool, no server.
* **CLOSED**: the connection is gone.

Rule (h11's): no other file sets ``mode``; every assignment here is one row of
``TRANSITIONS``, a table a test drives through exhaustively (it documents and checks the
machine; it is not consulted at run time, where a table lookup would cost the hot path).
``server is not None`` exactly when the mode is LINKED.

Byte counters refine a mode without being one: ``_passthrough`` (LINKED: the rest of a large
message streams through), ``_drop`` (the rest of a message being discarded), ``_need``.
"""

from __future__ import annotations

import asyncio
from typing import Final

from pgproxy import precheck
from pgproxy.admin.console import Console
from pgproxy.backend import ServerConnection
from pgproxy.client.host import ProxyServices
from pgproxy.client.units import ClientUnits
from pgproxy.pool.waiters import ServerRequest
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.protocol.framing import (
    FRONTEND_LIMIT_OF,
    check_frontend_header,
    length_at,
    read_length,
    type_table,
)
from pgproxy.wire import WireProtocol, log

# The modes, ordered so that the common ones (no task switch, straight to _process) are the
# smallest: ``mode <= SKIPPING`` is one comparison on every read.
LINKED: Final = 0
UNLINKED: Final = 1
SKIPPING: Final = 2
WAITING: Final = 3
LOGIN: Final = 4
CLOSED: Final = 5
ADMIN: Final = 6
MODE_NAMES: Final = ("LINKED", "UNLINKED", "SKIPPING", "WAITING", "LOGIN", "CLOSED", "ADMIN")

# Every transition: (from, to) -> the event that takes it.
TRANSITIONS: Final = {
    (LOGIN, UNLINKED): "logged in (transaction mode)",
    (LOGIN, LINKED): "logged in with its server (session mode)",
    (LOGIN, ADMIN): "logged in to the admin console",
    (UNLINKED, LINKED): "a message needs a server and an idle one is free",
    (UNLINKED, WAITING): "no idle server (or a LISTEN waits for the listener)",
    (WAITING, LINKED): "the pool hands over a server",
    (WAITING, UNLINKED): "a simple Query's wait failed or was cancelled; a LISTEN answered",
    (WAITING, SKIPPING): "the wait failed or was cancelled in an extended-protocol unit",
    (LINKED, UNLINKED): "the server owes nothing (released), or died between units",
    (LINKED, SKIPPING): "the server died in an extended-protocol unit",
    (SKIPPING, UNLINKED): "the Sync that ends the failed unit",
    **{(mode, CLOSED): "the connection is lost" for mode in (LOGIN, UNLINKED, WAITING)},
    **{(mode, CLOSED): "the connection is lost" for mode in (LINKED, SKIPPING, ADMIN)},
}

_INBUF_PAUSE: Final = 256 * 1024  # stop reading a client that sends this much while it waits
# Messages the proxy needs whole in transaction mode: their text decides what happens
# (LISTEN, dirty servers) or their statement names are rewritten (statements.py).
_NEED_WHOLE: Final = type_table((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE))
_SESSION_NEED_WHOLE: Final = type_table(())  # session mode inspects nothing
# A Query larger than this is streamed uninspected (never a LISTEN fast path; its server is
# cleaned as if it had LISTENed), so no client makes the proxy buffer much before a server is
# even in sight.
_WHOLE_QUERY_LIMIT: Final = 1024 * 1024


class ClientStream(ClientUnits):
    """The read loop and the link to a server, over :class:`~pgproxy.client.units.ClientUnits`
    (what each message does); :class:`~pgproxy.client.session.ClientSession` completes it."""

    __slots__ = (
        "_drop",
        "_idle_tx_since",
        "_idle_tx_timer",
        "_inbuf",
        "_inbuf_matters",
        "_need",
        "_passthrough",
        "_request",
        "console",
        "mode",
    )

    def __init__(self, proxy: ProxyServices) -> None:
        super().__init__(proxy)
        self.mode = LOGIN
        self._inbuf = bytearray()
        self._inbuf_matters: bool | None = None  # might_matter of _inbuf's first message
        self._need = 0
        self._passthrough = 0  # bytes of a large message still to forward as they arrive
        self._drop = 0  # bytes of a discarded message still to drop as they arrive
        self._request: ServerRequest | None = None  # waiting for a server
        self._idle_tx_timer: asyncio.TimerHandle | None = None
        # When the client went idle inside a transaction (0: it is not): its reads then take
        # the slow path, which ends the idle time (statistics, idle_transaction_timeout).
        self._idle_tx_since = 0.0
        self.console: Console | None = None  # in ADMIN mode: what answers it

    # --- what session.py provides (documented there) -------------------------------------------

    def _fast_path_allowed(self) -> bool:
        raise NotImplementedError

    def _answer_without_server(self, body: bytes) -> bool | None:
        raise NotImplementedError

    def _idle_tx_ended(self) -> None:
        raise NotImplementedError

    def fail(self, error: PgError) -> None:
        raise NotImplementedError

    def _console_read(self, data: bytes) -> None:
        raise NotImplementedError

    def _server_ready(self, server: ServerConnection | None, error: BaseException | None) -> None:
        raise NotImplementedError

    # --- the transitions that have no message of their own -----------------------------------

    def begin_streaming(self) -> None:
        """Login is over (transaction mode): from now on bytes are walked here."""
        self.mode = UNLINKED

    def begin_console(self, console: Console) -> None:
        """Login to the admin console is over: from now on ``console`` answers every read."""
        self.console = console
        self.mode = ADMIN

    def stream_lost(self) -> ServerConnection | None:
        """The connection is gone: returns the server it held, if any."""
        self.mode = CLOSED
        if self._request is not None:
            self._request.cancel()  # if a server was already assigned, it is handed back
        server, self.server = self.server, None
        return server

    def unlink_for_close(self) -> ServerConnection | None:
        """A fatal end decided by the proxy (idle-in-transaction timeout): the server goes."""
        server, self.server = self.server, None
        if server is not None:
            self.mode = UNLINKED
        return server

    # --- streaming: client -> server ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.mode <= SKIPPING and not self._idle_tx_since and not self._inbuf:
            self._process(data)  # the common case, one Python call less
        else:
            WireProtocol.data_received(self, data)  # via stream_received

    def stream_received(self, data: bytes) -> None:
        if self._idle_tx_since:
            self._idle_tx_ended()
        if self.mode == CLOSED:
            return
        if self.mode == ADMIN:
            self._console_read(data)
            return
        if self._inbuf:
            self._inbuf += data
            if self.mode == WAITING:
                self._bound_inbuf()
                return
            if len(self._inbuf) < self._need:
                # Completing one message the proxy must see whole: its size is already
                # bounded by Postgres' per-type limit, so keep reading.
                return
            data = bytes(self._inbuf)
            self._inbuf.clear()
        elif self.mode == WAITING:
            self._inbuf += data
            self._bound_inbuf()
            return
        self._process(data)

    def _bound_inbuf(self) -> None:
        """While waiting for a server, stop reading a client that keeps sending."""
        if len(self._inbuf) > _INBUF_PAUSE:
            self.pause_reading()

    def _process(self, data: bytes, matters_first: bool | None = None) -> None:
        """Walk the client's messages; forward runs of them to the linked server.

        ``matters_first``: ``precheck.might_matter`` of the first message, a Query whose
        pre-check ran before it had to wait for a server."""
        server = self.server
        n = len(data)
        if (
            n >= 5
            and data[0] == m.QUERY
            and n == 1 + length_at(data, 1)[0]
            and n <= _WHOLE_QUERY_LIMIT
            and not self._passthrough
            and not self._drop
            and self.mode != SKIPPING
            and (self._fast_path_allowed() if server is None else server.pool.mode == "transaction")
        ):
            # The common request, one whole Query and nothing else, in transaction mode: what
            # the loop below does with it, minus the loop. What the pre-check flags takes the
            # loop.
            if matters_first is None:
                matters_first = precheck.might_matter(data[5:])
            if not matters_first:
                if server is None:
                    server = self._try_link()
                    if server is None:
                        self._inbuf += data
                        self._inbuf_matters = False
                        self._bound_inbuf()
                        return
                self._query_forwarded(server)
                server.flow.client_message(m.QUERY)
                server.stats.bytes_received += n
                server.write(data)
                return
        pos = 0
        run_start = 0
        pooled = server is not None and server.pool.mode == "transaction"
        need_whole = _NEED_WHOLE if pooled else _SESSION_NEED_WHOLE
        try:
            if self._passthrough:
                pos = min(self._passthrough, n)
                self._passthrough -= pos
            elif self._drop:
                pos = run_start = min(self._drop, n)
                self._drop -= pos
            while pos < n:
                if n - pos < 5:
                    self._stash(data, pos, 5)
                    n = pos
                    break
                type_ = data[pos]
                length = length_at(data, pos + 1)[0]
                body: bytes | None = None
                matters, matters_first = matters_first, None  # might_matter(body), once known
                limit = FRONTEND_LIMIT_OF[type_]
                if not limit or length < 4 or length > limit:
                    try:
                        check_frontend_header(type_, length)
                    except m.ProtocolError as exc:
                        self._forward(server, data, run_start, pos)
                        self.fail(fatal(errors.PROTOCOL_VIOLATION, str(exc)))
                        return
                end = pos + 1 + length
                if type_ == m.TERMINATE:
                    self._forward(server, data, run_start, pos)
                    self.close()
                    return
                if self.mode == SKIPPING:
                    if end > n:
                        if type_ == m.SYNC:  # tiny: wait for the whole of it
                            self._stash(data, pos, end - pos)
                        else:
                            self._drop = end - n  # never buffer what is thrown away
                        n = pos if type_ == m.SYNC else n
                        run_start = n
                        break
                    if type_ == m.SYNC:
                        self.mode = UNLINKED
                        self.write(self._ready_idle())
                    pos = run_start = end
                    continue
                if server is None:
                    if type_ == m.SYNC or type_ == m.FLUSH:
                        # Nothing is in flight, so there is nothing to synchronise or flush.
                        if end > n:
                            self._stash(data, pos, end - pos)
                            n = pos
                            break
                        if type_ == m.SYNC:
                            self.write(self._ready_idle())
                        pos = run_start = end
                        continue
                    if (
                        type_ == m.QUERY
                        and length <= _WHOLE_QUERY_LIMIT
                        and self._fast_path_allowed()
                    ):
                        if end > n:
                            self._stash(data, pos, end - pos)
                            return
                        body = data[pos + 5 : end]
                        matters = precheck.might_matter(body)  # computed once per Query
                        if matters:
                            answered = self._answer_without_server(body)
                            if answered:
                                pos = run_start = end
                                continue
                            if answered is not None:  # the answer waits for the listener
                                self.mode = WAITING
                                self._inbuf += data[end:]
                                return
                    server = self._try_link()
                    if server is None:
                        self._inbuf += data[pos:]  # _inbuf was empty: this message comes first
                        self._inbuf_matters = matters
                        self._bound_inbuf()
                        return
                    run_start = pos
                    pooled = server.pool.mode == "transaction"
                    need_whole = _NEED_WHOLE if pooled else _SESSION_NEED_WHOLE
                if need_whole[type_] or (
                    type_ == m.EXECUTE and self.pending is not None and self.pending.portals
                ):
                    if end > n:
                        self._forward(server, data, run_start, pos)
                        self._stash(data, pos, end - pos)
                        return
                    if pooled:
                        if body is None:
                            body = data[pos + 5 : end]
                        try:
                            replacement = self._inspect(server, type_, body, matters)
                        except m.ProtocolError as exc:
                            self._forward(server, data, run_start, pos)
                            self.fail(fatal(errors.PROTOCOL_VIOLATION, str(exc)))
                            return
                        except PgError as exc:
                            self._forward(server, data, run_start, pos)
                            self.fail(exc)
                            return
                        if replacement is not None:
                            # One write for the whole read, not three: released below.
                            server.hold_output()
                            self._forward(server, data, run_start, pos)
                            server.write(replacement)
                            run_start = end
                server.flow.client_message(type_)
                if end > n:
                    self._passthrough = end - n
                    pos = n
                    break
                pos = end
            self._forward(server, data, run_start, n)
        finally:
            if server is not None:
                server.release_output()  # what a replacement held back (else a no-op)

    def _forward(self, server: ServerConnection | None, data: bytes, start: int, end: int) -> None:
        if server is not None and start < end:
            server.stats.bytes_received += end - start
            server.write(data[start:end] if start or end < len(data) else data)

    def _stash(self, data: bytes, pos: int, need: int) -> None:
        self._inbuf += data[pos:]
        self._need = need

    # --- getting and losing a server ---------------------------------------------------------

    def _try_link(self) -> ServerConnection | None:
        """Link an idle pooled server at once if there is one; else start waiting for one."""
        pool = self.pool
        assert pool is not None
        if pool.closing:  # retired by a reload: move to its successor
            pool = self.pool = self.proxy.pool_for(self.database, self.user)
        server = pool.take_idle()
        if server is not None:
            self._link(server)
            return server
        self.mode = WAITING
        self._request = pool.request(self._server_ready, self.proxy.config.proxy.query_wait_timeout)
        return None

    def _resume_input(self) -> None:
        data = bytes(self._inbuf)
        self._inbuf.clear()
        self._need = 0
        matters, self._inbuf_matters = self._inbuf_matters, None
        self.resume_reading()
        if data:
            self._process(data, matters)

    def _link(self, server: ServerConnection) -> None:
        self.mode = LINKED
        self.server = server
        server.link(self)
        settings = self.settings
        state = settings.state
        if state is None:
            state = settings.snapshot()
        if server.param_state is not state:
            sql = settings.sync_sql(server)
            if sql is not None:
                server.send_internal(sql)
                server.proxy_set = dict(settings.unreported)
            server.param_state = state
        if self.write_paused:
            server.pause_reading()

    def _waiting_answered(self) -> None:
        """What WAITING waited for, other than a server, is done (a LISTEN's answer)."""
        self.mode = UNLINKED
        self._resume_input()

    def _fail_unit(self, error: PgError) -> None:
        """End the client's current unit with ``error``, as Postgres would end a failed one."""
        if error.fatal:
            self.fail(error)
            return
        self.write(m.error_response(error.fields()))
        data = bytes(self._inbuf)
        self._inbuf.clear()
        self._inbuf_matters = None
        self._need = 0
        if len(data) >= 5 and data[0] in (m.QUERY, m.FUNCTION_CALL):
            # A simple-protocol unit is that one message: it gets its ReadyForQuery now.
            self.mode = UNLINKED
            end = 1 + read_length(data, 1)
            self.write(self._ready_idle())
            if end <= len(data):
                data = data[end:]
            else:
                self._drop = end - len(data)  # the rest of it is still on its way
                data = b""
        else:
            self.mode = SKIPPING  # drop through the next Sync, which gets the ReadyForQuery
        self.resume_reading()
        if data:
            self._process(data)

    def _ready_idle(self) -> bytes:
        """A ReadyForQuery I the proxy writes itself, with what must precede it."""
        return self.on_ready(m.IDLE) + m.ready_for_query(m.IDLE)

    # --- ServerLink: the server's side of the link -------------------------------------------

    def server_released(self) -> bool:
        # Mid-message (``_passthrough``), the server must get the rest of it before anyone
        # else writes to it: it stays linked until a later ReadyForQuery.
        if self.pool is None or self.pool.mode == "session" or self._inbuf or self._passthrough:
            return False
        self.mode = UNLINKED
        self.server = None
        return True

    def server_lost(self, error: PgError) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        self.mode = UNLINKED
        if self.closed:
            return
        flow = server.flow
        log.warning("%r: server %r lost: %s", self, server, error.message)
        if self.pool is not None and self.pool.mode == "session":
            self.fail(error.with_severity("FATAL"))
            return
        if flow.in_transaction or flow.copy_in or len(flow.pending) > 1 or self._passthrough:
            # Carrying on would run the rest of the transaction in autocommit (PROTOCOL-NOTES 33).
            self.fail(error.with_severity("FATAL"))
            return
        if not flow.pending and not flow.unsynced:
            return  # nothing was in flight: the next query simply gets another server
        err = error.with_severity("ERROR")
        self.write(m.error_response(err.fields()))
        if flow.pending:
            self.write(self._ready_idle())
        else:
            self.mode = SKIPPING
