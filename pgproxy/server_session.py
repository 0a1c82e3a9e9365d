"""The session on one upstream server, as Postgres holds it, whoever the proxy lends it to.

Owns what a server connection is apart from pooling and linking: its identity (``pid``,
``secret``), the parameters it reported and those the proxy SET on it, its statements
(prepared.ServerStatements), its protocol position (protocol.flow.ServerFlow), where its
notifications go, and internal work: queries the proxy runs on it for itself (parameter sync,
rollback, reset, UNLISTEN), each as its own simple Query whose replies are swallowed.

Rules that keep it honest:
* It knows nothing of clients or pools: backend.ServerConnection, its only subclass (and the
  class every server is), adds them and the reply stream that serves them. This module never
  imports backend.
* Internal work is sent only while the server owes its client nothing, so the oldest queued
  query owns every reply up to its ReadyForQuery, and each query ends exactly once: its future
  gets the outcome or the connection's loss, or, with nobody waiting, a failure is logged.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pgproxy.params import ParamState
from pgproxy.prepared import ServerStatements
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.protocol.flow import ServerFlow
from pgproxy.wire import WireProtocol, log

_SERIALS = itertools.count(1)


@dataclass
class InternalResult:
    error: PgError | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)  # CommandComplete tags, in order


class _Internal:
    __slots__ = ("future", "result")

    def __init__(self, future: asyncio.Future[InternalResult] | None) -> None:
        self.future = future
        self.result = InternalResult()


class ServerSession(WireProtocol):
    __slots__ = (
        "_fatal",
        "_internal",
        "address",
        "flow",
        "lost_callback",
        "needs_unlisten",
        "notification_sink",
        "notifications_done",
        "param_state",
        "params",
        "pid",
        "proxy_set",
        "ready",
        "secret",
        "serial",
        "statements",
    )

    def __init__(self, max_prepared_statements: int) -> None:
        super().__init__()
        self.params: dict[str, str] = {}  # reported parameters, as the server last said
        self.proxy_set: dict[str, str] = {}  # unreported parameters the proxy SET here
        self.pid = 0
        self.secret = b""
        self.address = ("", 0)  # the upstream (host, port) it was opened on: where cancels go
        self.serial = next(_SERIALS)  # this process's number for it (the admin console's id)
        self.flow = ServerFlow()
        self.ready = False  # handshake done
        self._internal: deque[_Internal] = deque()
        self._fatal: PgError | None = None  # what to report when the connection goes
        # The listener connection routes notifications and its loss here; pooled servers don't.
        self.notification_sink: Callable[[bytes], None] | None = None
        self.notifications_done: Callable[[], None] | None = None  # after each read with some
        self.lost_callback: Callable[[PgError], None] | None = None
        # True once this server may be LISTENing (a forwarded LISTEN, a stray notification):
        # it runs UNLISTEN * before anyone else gets it (PROTOCOL-NOTES 11).
        self.needs_unlisten = False
        self.statements = ServerStatements(max_prepared_statements)
        # The client parameter state (params.ParamState) this server's parameters were last
        # made to agree with; anything that may change them forgets it.
        self.param_state: ParamState | None = None

    # --- internal work -----------------------------------------------------------------------

    def run_internal(self, sql: str) -> asyncio.Future[InternalResult]:
        """Send ``sql`` as its own Query and get its outcome; its replies are swallowed.

        Only call while the server owes its client nothing (between units).
        """
        fut: asyncio.Future[InternalResult] = asyncio.get_running_loop().create_future()
        self._send_internal(_Internal(fut), sql)
        return fut

    def send_internal(self, sql: str) -> None:
        """Like run_internal, for work nobody waits on (a failure is logged)."""
        self._send_internal(_Internal(None), sql)

    def _send_internal(self, item: _Internal, sql: str) -> None:
        self._internal.append(item)
        statements = self.statements  # a simple Query destroys the unnamed statement
        statements.unnamed, statements.unnamed_unit = None, -1
        self.param_state = None
        self.write(m.query(sql))

    @property
    def busy_internally(self) -> bool:
        return bool(self._internal)

    def _internal_message(self, type_: int, body: bytes) -> None:
        item = self._internal[0]
        if type_ == m.READY_FOR_QUERY:
            self._internal.popleft()
            self.flow.status = body[0] if body else m.IDLE
            if item.future is not None and not item.future.done():
                item.future.set_result(item.result)
            elif item.result.error is not None:
                log.warning("%r: internal query failed: %s", self, item.result.error.message)
        elif type_ == m.PARAMETER_STATUS:
            name, value = m.parse_parameter_status(body)
            self.params[name] = value
            item.result.params[name] = value
        elif type_ == m.ERROR_RESPONSE:
            err = PgError.from_fields(m.parse_error_fields(body))
            if err.fatal:
                self._fatal = err
            elif item.result.error is None:
                item.result.error = err
        elif type_ == m.NOTIFICATION_RESPONSE:
            self._stray_notification(body)
        elif type_ == m.COMMAND_COMPLETE:
            item.result.tags.append(m.parse_command_complete(body))

    def _internal_lost(self, error: PgError) -> None:
        """The connection is gone: every queued query that someone waits on fails."""
        for item in self._internal:
            if item.future is not None and not item.future.done():
                item.future.set_exception(error)
        self._internal.clear()

    # --- what is not any client's -----------------------------------------------------------

    def _stray_notification(self, body: bytes) -> None:
        if self.notification_sink is not None:
            self.notification_sink(body)
        else:
            self.needs_unlisten = True  # a leftover LISTEN; the listener path delivers

    def abort_with(self, error: PgError) -> None:
        """Drop the connection now; ``error`` is what its client or owner is told."""
        self._fatal = error
        self.abort()

    def _protocol_failure(self, why: str) -> None:
        log.error("%r: %s; closing", self, why)
        self._fatal = PgError(errors.PROTOCOL_VIOLATION, why)
        self.abort()
