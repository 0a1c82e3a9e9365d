"""One pooled upstream server connection, once open: whom it serves, and how its replies get there.

The session itself (parameters, statements, protocol position) and the proxy's own queries on it
are the ServerSession base class's (server_session.py); opening it is server_open.py's.

Theory of operation. A server connection belongs to one pool, its ``ServerHome``, for its whole
life and is in one of three situations:

* **linked** to a client session (``client`` is set): its replies are forwarded to that client
  in runs of bytes; only ReadyForQuery, ErrorResponse, ParameterStatus, NotificationResponse and
  CopyInResponse are looked at (``_INSPECT``).
* **idle** in its pool: it is still read (PROTOCOL-NOTES 19), and anything it says is consumed
  here, never handed to the next client. An error or EOF discards it.
* running **internal work** (``_internal`` non-empty): queries the proxy injected as their own
  Sync units (parameter sync, rollback, reset). Their replies come before any client reply
  because internal work is only sent while the server owes its client nothing; they are
  swallowed, ParameterStatus included (PROTOCOL-NOTES 5).

Release decisions are taken after a whole chunk has been processed: bytes that follow the
releasing ReadyForQuery in the same chunk are idle-time messages and must not reach the client.

What keeps it honest: a server knows its client only as a ``ServerLink`` and its pool only as a
``ServerHome``, both declared here, so this module imports neither (pgproxy.pool imports it,
as does server_open.py, which opens servers and is never imported back).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from time import monotonic  # a global, not a module attribute: read once per transaction
from typing import Final

from mypy_extensions import trait  # a marker for the optional mypyc build (setup.py)

from pgproxy.config import PoolMode
from pgproxy.pool.stats import PoolStats
from pgproxy.prepared import UNNAMED_UNKNOWN, ReplyFilter
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.protocol.flow import FlowError
from pgproxy.protocol.framing import LARGE_MESSAGE_LIMIT, length_at, type_table
from pgproxy.server_session import ServerSession
from pgproxy.wire import WireProtocol, log

# Message types looked at, as framing.type_table()s.
_INSPECTED: Final = (
    m.READY_FOR_QUERY,
    m.ERROR_RESPONSE,
    m.PARAMETER_STATUS,
    m.NOTIFICATION_RESPONSE,
    m.COPY_IN_RESPONSE,
    m.COPY_BOTH_RESPONSE,
)
# While a client has LISTEN effects waiting for their transaction's outcome: CommandComplete.
# While some ParseComplete/CloseComplete replies may belong to the proxy (prepared.py): those.
_WATCHED: Final = (m.COMMAND_COMPLETE,)
_FILTERED_TYPES: Final = (m.PARSE_COMPLETE, m.CLOSE_COMPLETE)
_INSPECT: Final = type_table(_INSPECTED)
_INSPECT_WATCHING: Final = type_table(_INSPECTED + _WATCHED)
_INSPECT_FILTERING: Final = type_table(_INSPECTED + _FILTERED_TYPES)
_INSPECT_BOTH: Final = type_table(_INSPECTED + _WATCHED + _FILTERED_TYPES)
_FILTERED: Final = type_table(_FILTERED_TYPES)
# A read that ends with a whole ReadyForQuery (the common reply: T/D/.../C/Z in one chunk).
# A set, not endswith(tuple): one slice and one lookup cost less, compiled or not.
_RFQ_ENDINGS: Final = frozenset(
    m.ready_for_query(s) for s in (m.IDLE, m.IN_TRANSACTION, m.FAILED_TRANSACTION)
)


@trait
class ServerLink:
    """What a server needs from the client it is linked to (implemented by ClientSession)."""

    __slots__ = ()

    # False while ``wants_stall`` would certainly say no: saves a call per ReadyForQuery.
    may_stall = False

    def server_output(self, data: bytes) -> None:
        raise NotImplementedError

    def server_parameter(self, name: str, value: str) -> None:
        raise NotImplementedError

    def server_released(self) -> bool:
        """The server owes nothing; return True if the client lets it go now."""
        raise NotImplementedError

    def server_lost(self, error: PgError) -> None:
        raise NotImplementedError

    def on_ready(self, status: int) -> bytes:
        """A ReadyForQuery is about to be forwarded: bytes to write just before it."""
        return b""

    def wants_stall(self, status: int) -> bool:
        """Should this ReadyForQuery wait? If so the client calls ``resume_stream`` later."""
        return False

    def command_complete(self, tag: bytes) -> None:
        """A CommandComplete passed by (only while the server's ``watch_tags`` is set)."""

    def error_seen(self) -> None:
        """An ErrorResponse passed by (only while the server's ``watch_tags`` is set)."""


@trait
class ServerHome:
    """What a server needs from the pool it belongs to for its whole life (implemented by
    pool.Pool, which backend.py never imports)."""

    __slots__ = ()

    # Attributes, not properties: ``mode`` is read for every client message (client/).
    name: str
    mode: PoolMode
    stats: PoolStats  # the pool's traffic counters (pool/stats.py)

    def release(self, server: ServerConnection) -> None:
        """Take the server back from its client: it owes nothing to anyone."""
        raise NotImplementedError

    def discard(self, server: ServerConnection) -> None:
        """Forget a server that is closed or about to be (idempotent)."""
        raise NotImplementedError

    def close_server(self, server: ServerConnection) -> None:
        """Take the server out of use for good and close it."""
        raise NotImplementedError


class ServerConnection(ServerSession):
    """A server of one pool (``pool``), lent to one client at a time (``client``)."""

    __slots__ = (
        "_need",
        "_partial",
        "_passthrough",
        "_stalled",
        "cancels_in_flight",
        "client",
        "created_at",
        "idle_in_tx",
        "idle_since",
        "linked_at",
        "pool",
        "replies",
        "stats",
        "watch_tags",
    )

    def __init__(self, pool: ServerHome, max_prepared_statements: int) -> None:
        super().__init__(max_prepared_statements)
        self.pool = pool
        self.stats = pool.stats  # the pool's counters, bumped here without a trait call
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.linked_at = 0.0  # when the current client got it (0: not linked since release)
        self.idle_in_tx = 0.0  # seconds of that link its client spent idle in a transaction
        self.client: ServerLink | None = None
        self.cancels_in_flight = 0
        self._partial = bytearray()
        self._need = 0
        self._passthrough = 0
        # Set while the linked client has LISTEN/UNLISTEN effects awaiting COMMIT or ROLLBACK.
        self.watch_tags = False
        self._stalled = False  # a ReadyForQuery waits, unread, for the client (a fence)
        self.replies = ReplyFilter()

    def __repr__(self) -> str:
        return f"<server pid={self.pid} pool={self.pool.name}>"

    # --- streaming ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # The common reply goes straight to _whole_reply (two Python calls per read, not four);
        # a linked server is past its handshake.
        client = self.client
        if (
            client is not None
            and not client.may_stall
            and not self._stalled
            and not self._partial
            and not self._passthrough
            and not self._internal
            and not self.watch_tags
            and data[-6:] in _RFQ_ENDINGS
            and self._whole_reply(client, data)
        ):
            return
        WireProtocol.data_received(self, data)

    def stream_received(self, data: bytes) -> None:
        try:
            self._stream(data)
        except m.ProtocolError as exc:  # a malformed message from the server
            self._protocol_failure(f"malformed message from server: {exc}")

    def _stream(self, data: bytes) -> None:
        if self._stalled:
            self._partial += data
            return
        if self._partial:
            self._partial += data
            if len(self._partial) < self._need:
                return
            data = bytes(self._partial)
            self._partial.clear()
        client = owner = self.client
        out: list[bytes] = []
        run_start = 0
        pos = 0
        n = len(data)
        release = False
        replies = self.replies
        if replies.entries or replies.rewrites:
            inspect = _INSPECT_BOTH if self.watch_tags else _INSPECT_FILTERING
        else:
            inspect = _INSPECT_WATCHING if self.watch_tags else _INSPECT
        if self._passthrough:
            pos = min(self._passthrough, n)
            self._passthrough -= pos
        # Forwarding to a client with no internal work queued: only ``inspect`` types are
        # looked at. Recomputed after every inspected message (either may change there).
        plain = client is not None and not self._internal
        while pos < n:
            if n - pos < 5:
                self._stash(data, pos, 5)
                n = pos
                break
            type_ = data[pos]
            end = pos + 1 + length_at(data, pos + 1)[0]
            if end <= pos + 4 or end - pos - 1 > LARGE_MESSAGE_LIMIT:
                self._protocol_failure("invalid message length from server")
                return
            if plain and not inspect[type_]:
                if end > n:  # stream the rest of a large message as it arrives
                    self._passthrough = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                self._stash(data, pos, end - pos)
                n = pos
                break
            body = data[pos + 5 : end]
            if (
                type_ == m.READY_FOR_QUERY
                and plain
                and client is not None
                and client.may_stall
                and client.wants_stall(body[0] if body else m.IDLE)
            ):
                if run_start < pos:
                    out.append(data[run_start:pos])
                self._partial += data[pos:]
                self._need = 0
                self._stalled = True
                self.pause_reading()
                run_start = n = pos
                break
            if self._internal:
                if run_start < pos and client is not None:
                    out.append(data[run_start:pos])
                run_start = end
                self._internal_message(type_, body)
            elif client is None:
                run_start = end
                self._idle_message(type_, body)
                if self.closed:
                    break  # what the client was owed (its ReadyForQuery) still goes out
            else:
                keep, injected, done = self._linked_message(client, type_, body)
                if not keep or injected:
                    if run_start < pos:
                        out.append(data[run_start:pos])
                    if injected:
                        out.append(injected)
                    run_start = pos if keep else end
                if done:
                    # Replies after this point belong to idle time, not to this client.
                    if run_start < end:
                        out.append(data[run_start:end])
                    run_start = end
                    if client.server_released():
                        release = True
                        client = None
            pos = end
            plain = client is not None and not self._internal
        if client is not None and run_start < n:
            out.append(data[run_start:n] if run_start or n < len(data) else data)
        if out and owner is not None:  # the client linked when this read began
            output = b"".join(out) if len(out) > 1 else out[0]
            self.stats.bytes_sent += len(output)
            owner.server_output(output)
        if self.notifications_done is not None:
            self.notifications_done()
        if release:
            self.pool.release(self)

    def _whole_reply(self, client: ServerLink, data: bytes) -> bool:
        """The common case of ``_stream``, in one pass: ``data`` is whole messages ending with
        the ReadyForQuery of the unit the client is waiting on, and none before it needs
        looking at but ParseComplete/CloseComplete. Returns False, having changed nothing,
        for anything else. The caller has checked that ``data[-6]`` is a 'Z'."""
        last = len(data) - 6  # where the ReadyForQuery starts
        pos = 0
        replies = self.replies
        inspect = _INSPECT_FILTERING if replies.entries else _INSPECT
        filtered: list[int] | None = None  # where the ParseComplete/CloseComplete replies are
        while pos < last:
            type_ = data[pos]
            if inspect[type_]:
                if not _FILTERED[type_]:
                    return False
                if filtered is None:
                    filtered = [pos]
                else:
                    filtered.append(pos)
            length = length_at(data, pos + 1)[0]
            if length < 4:
                return False  # the general walk reports it
            pos += 1 + length
        flow = self.flow
        if pos != last or len(flow.pending) != 1:
            return False
        if filtered is not None:
            data = self._drop_swallowed(data, filtered)
            last = len(data) - 6
        status = data[-1]
        flow.server_ready(status)
        if replies.rewrites:
            replies.unit_done(flow.done - 1)
        injected = client.on_ready(status)
        if injected:
            data = data[:last] + injected + data[last:]
        self.stats.bytes_sent += len(data)
        client.server_output(data)
        if flow.idle and client.server_released():
            self.pool.release(self)
        return True

    def _drop_swallowed(self, data: bytes, filtered: list[int]) -> bytes:
        """``data`` without the replies (at ``filtered``) to Parse/Close the proxy injected."""
        out = []
        run_start = 0
        for at in filtered:
            if self.replies.reply(data[at]):
                out.append(data[run_start:at])
                run_start = at + 1 + length_at(data, at + 1)[0]
        if not run_start:
            return data
        out.append(data[run_start:])
        return b"".join(out)

    def resume_stream(self) -> None:
        """Continue after a stall: the held ReadyForQuery and what followed it."""
        if not self._stalled:
            return
        self._stalled = False
        self.resume_reading()
        if self._partial:
            self.stream_received(b"")

    def _stash(self, data: bytes, pos: int, need: int) -> None:
        self._partial += data[pos:]
        self._need = need

    def _linked_message(
        self, client: ServerLink, type_: int, body: bytes
    ) -> tuple[bool, bytes, bool]:
        """An inspected message while linked: (forward it?, bytes to inject first, done?)."""
        if type_ == m.READY_FOR_QUERY:
            status = body[0] if body else m.IDLE
            try:
                self.flow.server_ready(status)
            except FlowError:
                self._protocol_failure("unexpected ReadyForQuery from server")
                return False, b"", False
            if self.replies:
                self.replies.unit_done(self.flow.done - 1)
            return True, client.on_ready(status), self.flow.idle
        if type_ == m.PARAMETER_STATUS:
            name, value = m.parse_parameter_status(body)
            self.params[name] = value
            self.param_state = None
            client.server_parameter(name, value)
            return True, b"", False
        if type_ == m.ERROR_RESPONSE:
            fields = m.parse_error_fields(body)
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                # Held back: the client decides what to tell its user once the socket closes.
                self._fatal = PgError.from_fields(fields)
                return False, b"", False
            statements = self.statements
            if statements.unnamed_unit == self.flow.done:
                statements.unnamed = UNNAMED_UNKNOWN  # what set it may have been skipped
            reworded = b""
            if self.replies:
                fixed = self.replies.reword(fields, self.flow.done)
                if fixed is not None:  # an error the proxy provoked, in the client's words
                    reworded = m.error_response(fixed)
                self.replies.error(self.flow.done)  # the rest of this unit is skipped
            if self.watch_tags:
                client.error_seen()
            return not reworded, reworded, False
        if type_ == m.COMMAND_COMPLETE:
            if body.startswith((b"DEALLOCATE ALL", b"DISCARD ALL")):
                self.statements.clear()  # every statement on this server is gone
            client.command_complete(body)
            return True, b"", False
        if _FILTERED[type_]:
            return not self.replies.reply(type_), b"", False
        if type_ == m.NOTIFICATION_RESPONSE:
            if self.pool.mode == "session":
                return True, b"", False  # the client's own LISTEN, passed through
            # A pooled server may carry a LISTEN it should not; the listener delivers (DESIGN.md).
            self.needs_unlisten = True
            return False, b"", False
        # CopyInResponse / CopyBothResponse
        self.flow.server_copy_in()
        return True, b"", False

    def _idle_message(self, type_: int, body: bytes) -> None:
        if type_ == m.PARAMETER_STATUS:
            name, value = m.parse_parameter_status(body)
            self.params[name] = value
            self.param_state = None
        elif type_ == m.ERROR_RESPONSE:
            err = self._fatal = PgError.from_fields(m.parse_error_fields(body))
            log.info("%r: closed by server while idle: %s", self, err.message)
            self.pool.close_server(self)
        elif type_ == m.NOTICE_RESPONSE:
            fields = m.parse_error_fields(body)
            log.debug("%r: notice while idle: %s", self, fields.get("M", ""))
        elif type_ == m.NOTIFICATION_RESPONSE:
            self._stray_notification(body)
        else:
            log.warning("%r: unexpected message %r while idle; closing", self, chr(type_))
            self.pool.close_server(self)

    # --- teardown ----------------------------------------------------------------------------

    def on_lost(self, exc: Exception | None) -> None:
        error = self._fatal or PgError(
            errors.CONNECTION_FAILURE,
            "server closed the connection unexpectedly",
            detail=str(exc) if exc else None,
        )
        self._internal_lost(error)
        client = self.client
        self.client = None
        self.pool.discard(self)
        if client is not None:
            client.server_lost(error)
        if self.lost_callback is not None:
            self.lost_callback(error)

    def feeder(self) -> WireProtocol | None:
        feeder = self.client
        return feeder if isinstance(feeder, WireProtocol) else None

    def link(self, client: ServerLink) -> None:
        self.client = client
        self.linked_at = monotonic()
        self.statements.unnamed_unit = -1  # the last client's units are all over: settled
        self.flow.reset()
        replies = self.replies
        if replies.entries or replies.rewrites:
            replies.clear()

    def unlink(self) -> None:
        self.client = None
        self.watch_tags = False
        self.idle_since = time.monotonic()
        if self.read_paused:  # paused for a slow client
            self.resume_reading()

    def age(self, now: float | None = None) -> float:
        return (now or time.monotonic()) - self.created_at


OnServer = Callable[[ServerConnection], None]
