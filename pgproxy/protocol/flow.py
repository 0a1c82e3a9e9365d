"""What a server still owes its client: the rule that decides when a server may be released.

Theory of operation (PROTOCOL-NOTES 2, 6, 31, 32). Everything the client forwards and the server
answers passes through :class:`ServerFlow`, which counts the messages that will each produce
exactly one ReadyForQuery (Query, Sync, FunctionCall) and watches the states in which the server is
not reusable even at ReadyForQuery ``I``:

* ``pending``  -- ReadyForQuery-producing messages forwarded and not yet answered, oldest first.
* ``unsynced`` -- extended-protocol messages forwarded since the last Sync: the server has an
  implicit transaction open (e.g. asyncpg's Parse/Describe/Flush) and must stay with the client.
* ``copy_in``  -- the server asked for COPY data and the client has not yet sent CopyDone/CopyFail.
  While copying, the server ignores Sync and Flush, including a Sync the client sent before the
  CopyInResponse arrived (libpq sends one with every extended Execute, then another after
  CopyDone). A client may send its CopyData and CopyDone before the CopyInResponse too
  (pipelining): ``ended_ahead`` remembers such ends, so that COPY is over as soon as it starts.
* ``status``   -- the transaction status byte of the last ReadyForQuery.

After an extended-protocol error Postgres skips everything up to the next Sync; because the
count is per Sync/Query/FunctionCall and every skipped unit still ends at a Sync, the count stays
exact for what drivers send. The one shape where it would not (a simple Query pipelined after
unsynced extended messages, which no libpq-based driver can send) errs on the safe side: the
count stays too high, so the server remains with its client instead of going back dirty.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from pgproxy.protocol import messages as m
from pgproxy.protocol.framing import type_table

_IDLE: Final = m.IDLE
_RFQ_PRODUCERS: Final = type_table((m.QUERY, m.SYNC, m.FUNCTION_CALL))
_EXTENDED: Final = type_table((m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE))


class FlowError(Exception):
    """The server answered something the client never asked for."""


class ServerFlow:
    __slots__ = (
        "copy_in",
        "done",
        "ended_ahead",
        "last_statement",
        "pending",
        "sent",
        "status",
        "unsynced",
        "xacts",
    )

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        # Units (Sync/Query/FunctionCall) sent and answered since the link: a message sent
        # when ``sent == k`` belongs to unit k, which the server is running while ``done == k``.
        self.sent = 0
        self.done = 0
        self.xacts = 0  # ReadyForQuery I since the link: transactions ended (for statistics)
        self.unsynced = False
        self.copy_in = False
        self.status = m.IDLE
        self.last_statement = 0  # the unit of the last Query/FunctionCall/Execute forwarded
        # CopyDone/CopyFail forwarded while no COPY ran, oldest first: (the unit whose COPY they
        # end, ``sent`` when forwarded). The server ignores them if that unit starts no COPY.
        self.ended_ahead: deque[tuple[int, int]] = deque()

    def client_message(self, type_: int) -> None:
        """Account for one message forwarded from the client to the server."""
        if self.copy_in:
            if type_ == m.COPY_DONE or type_ == m.COPY_FAIL:
                self.copy_in = False
            return  # the server ignores Sync/Flush during COPY; CopyData needs no bookkeeping
        if _RFQ_PRODUCERS[type_]:
            if type_ != m.SYNC:
                self.last_statement = self.sent
            self.pending.append(type_)
            self.sent += 1
            self.unsynced = False
        elif _EXTENDED[type_]:
            if type_ == m.EXECUTE:
                self.last_statement = self.sent
            self.unsynced = True
        elif type_ == m.COPY_DONE or type_ == m.COPY_FAIL:
            self.ended_ahead.append((self.last_statement, self.sent))

    def server_ready(self, status: int) -> None:
        """A ReadyForQuery arrived from the server."""
        if not self.pending:
            raise FlowError("ReadyForQuery with nothing outstanding")
        self.pending.popleft()
        self.done += 1
        self.status = status
        if status == _IDLE:
            self.xacts += 1
        if self.ended_ahead:
            self._forget_ended_before(self.done)

    def _forget_ended_before(self, unit: int) -> None:
        ended = self.ended_ahead
        while ended and ended[0][0] < unit:
            ended.popleft()  # that unit is over without a COPY: the server ignored them

    def server_copy_in(self) -> None:
        """CopyInResponse (or CopyBothResponse): the server now waits for CopyData."""
        if self.ended_ahead:
            self._forget_ended_before(self.done)
            if self.ended_ahead and self.ended_ahead[0][0] == self.done:
                self._copy_ended_ahead()
                return
        self.copy_in = True
        if self.pending and self.pending[0] == m.SYNC:
            # The Sync that followed the extended Execute is swallowed by the COPY, so the
            # implicit transaction stays open until the Sync the client sends after CopyDone.
            self.pending.popleft()
            self.done += 1
            self.unsynced = True

    def _copy_ended_ahead(self) -> None:
        """The COPY just started was ended by a CopyDone/CopyFail the client sent ahead: the
        server reads it after the Syncs sent between the COPY's Execute and it, which the COPY
        swallows; what the client sent after it counts as usual."""
        _, sent_at = self.ended_ahead.popleft()
        pending = self.pending
        own_message = 1 if pending and pending[0] != m.SYNC else 0  # the COPY's own Query
        swallowed = sent_at - self.done - own_message
        while swallowed > 0 and pending and pending[0] == m.SYNC:
            pending.popleft()
            self.done += 1
            swallowed -= 1
            # The Execute's implicit transaction stays open until a Sync sent after the end.
            if self.sent == sent_at:
                self.unsynced = True

    @property
    def in_transaction(self) -> bool:
        return self.status != m.IDLE

    @property
    def idle(self) -> bool:
        """True when the server owes nothing and holds no transaction: safe to hand to others."""
        return not self.pending and not self.unsynced and not self.copy_in and self.status == m.IDLE

    def reset(self) -> None:
        self.sent = self.done = self.xacts = 0
        if self.pending:  # usually empty: a truth test is cheaper than a method call
            self.pending.clear()
        if self.ended_ahead:
            self.ended_ahead.clear()
        self.last_statement = 0
        self.unsynced = False
        self.copy_in = False
        self.status = m.IDLE
