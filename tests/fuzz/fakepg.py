"""A tiny Postgres backend for the in-memory harness: answers what the proxy writes to a server.

Enough of Postgres' behaviour for the proxy's bookkeeping to be tested against it: named and
unnamed statements and portals (errors for unknown or duplicate names), skip-to-Sync after an
extended-protocol error, transaction status (BEGIN/COMMIT/ROLLBACK, failed transactions), COPY
FROM STDIN (CopyData, CopyDone, CopyFail) and COPY TO STDOUT, and CopyData/CopyDone/CopyFail
ignored outside COPY, as Postgres does. Anything else is a one-row SELECT or a bare command.

Rule: it is fed only whole frontend messages, in order, and answers each at once; a message it
cannot parse gets the FATAL Postgres would send, then the connection is closed.
"""

from __future__ import annotations

from pgproxy.backend import ServerConnection
from pgproxy.protocol import messages as m
from pgproxy.protocol.framing import read_length
from pgproxy.testing.memory import MemoryTransport


def _error(sqlstate: str, message: str, severity: str = "ERROR") -> bytes:
    return m.error_response({"S": severity, "V": severity, "C": sqlstate, "M": message})


ROW = m.row_description([("x", 23)]) + m.data_row(["1"])


class FakePostgres:
    """The other end of one in-memory :class:`ServerConnection`."""

    def __init__(self, server: ServerConnection) -> None:
        self.server = server
        self.pending = bytearray()
        self.statements: set[str] = set()
        self.portals: set[str] = set()
        self.skipping = False  # after an extended-protocol error, until Sync
        self.status = m.IDLE
        self.copy_in = False
        self.gone = False  # the proxy closed it; connection_lost was delivered

    @property
    def transport(self) -> MemoryTransport:
        transport = self.server.transport
        assert isinstance(transport, MemoryTransport)
        return transport

    def pump(self) -> bool:
        """Answer everything written so far; True if anything was read or happened."""
        if self.gone:
            return False
        self.pending += self.transport.take()
        if self.transport.closed:
            self.gone = True
            self.server.connection_lost(None)
            return True
        out = bytearray()
        progressed = False
        while len(self.pending) >= 5:
            length = read_length(self.pending, 1)
            if len(self.pending) < 1 + length:
                break
            type_, body = self.pending[0], bytes(self.pending[5 : 1 + length])
            del self.pending[: 1 + length]
            progressed = True
            try:
                out += self.answer(type_, body)
            except m.ProtocolError as exc:
                out += _error("08P01", str(exc), "FATAL")
                self.transport.close()
                break
        if out and not self.server.closed:
            self.server.data_received(bytes(out))
        return progressed

    def answer(self, type_: int, body: bytes) -> bytes:
        if type_ == m.TERMINATE:
            self.transport.close()
            return b""
        if self.copy_in:
            return self._copy_message(type_, body)
        if type_ == m.SYNC:
            self.skipping = False
            self.portals.discard("")
            return m.ready_for_query(self.status)
        if type_ in (m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL, m.FLUSH):
            return b""  # ignored outside COPY, as Postgres does
        if type_ == m.QUERY:
            self.skipping = False
            return self._query(m.parse_query(body))
        if type_ == m.FUNCTION_CALL:  # simple protocol: its own ReadyForQuery
            self.skipping = False
            return _error("42883", "function calls are not supported here") + (
                m.ready_for_query(self.status)
            )
        if self.skipping:
            return b""
        try:
            return self._extended(type_, body)
        except _Failed as exc:
            self.skipping = True
            if self.status == m.IN_TRANSACTION:
                self.status = m.FAILED_TRANSACTION
            return exc.response

    def _copy_message(self, type_: int, body: bytes) -> bytes:
        if type_ == m.COPY_DATA or type_ in (m.FLUSH, m.SYNC):
            return b""
        self.copy_in = False
        if type_ == m.COPY_DONE:
            return m.command_complete("COPY 1") + m.ready_for_query(self.status)
        if type_ == m.COPY_FAIL:
            self.status = m.FAILED_TRANSACTION if self.status != m.IDLE else m.IDLE
            return _error("57014", "COPY from stdin failed") + m.ready_for_query(self.status)
        return _error("08P01", f"unexpected message type {type_} during COPY from stdin") + (
            m.ready_for_query(self.status)
        )

    def _query(self, sql: str) -> bytes:
        self.statements.discard("")
        self.portals.discard("")
        word = sql.strip().split(" ", 1)[0].upper().rstrip(";")
        upper = sql.upper()
        if self.status == m.FAILED_TRANSACTION and word not in ("ROLLBACK", "COMMIT", "ABORT"):
            return _error("25P02", "current transaction is aborted") + m.ready_for_query(
                self.status
            )
        if word in ("BEGIN", "START"):
            self.status = m.IN_TRANSACTION
            return m.command_complete("BEGIN") + m.ready_for_query(self.status)
        if word in ("COMMIT", "ROLLBACK", "ABORT", "END"):
            tag = "ROLLBACK" if self.status == m.FAILED_TRANSACTION else word
            self.status = m.IDLE
            return m.command_complete(tag) + m.ready_for_query(self.status)
        if word == "COPY" and "FROM STDIN" in upper:
            self.copy_in = True
            return m.message(m.COPY_IN_RESPONSE, b"\0\0\0")
        if word == "COPY" and "TO STDOUT" in upper:
            return (
                m.message(m.COPY_OUT_RESPONSE, b"\0\0\0")
                + m.message(m.COPY_DATA, b"1\n")
                + m.COPY_DONE_MESSAGE
                + m.command_complete("COPY 1")
                + m.ready_for_query(self.status)
            )
        if word == "ERROR" or not word:
            if self.status == m.IN_TRANSACTION:
                self.status = m.FAILED_TRANSACTION
            return _error("42601", "syntax error") + m.ready_for_query(self.status)
        if word == "DEALLOCATE" and "ALL" in upper:
            self.statements -= {name for name in self.statements if name}
        if word == "DISCARD":
            self.statements.clear()
            self.portals.clear()
        rows = ROW if word == "SELECT" else b""
        tag = "SELECT 1" if word == "SELECT" else word
        return rows + m.command_complete(tag) + m.ready_for_query(self.status)

    def _extended(self, type_: int, body: bytes) -> bytes:
        if type_ == m.PARSE:
            name, _sql, _oids = m.parse_parse(body)
            if name and name in self.statements:
                raise _Failed("42P05", f'prepared statement "{name}" already exists')
            self.statements.add(name)
            return m.PARSE_COMPLETE_MESSAGE
        if type_ == m.BIND:
            portal, pos = m.read_cstring(body, 0)
            statement, _ = m.read_cstring(body, pos)
            if statement not in self.statements:
                raise _Failed("26000", f'prepared statement "{statement}" does not exist')
            if portal and portal in self.portals:
                raise _Failed("42P03", f'cursor "{portal}" already exists')
            self.portals.add(portal)
            return m.BIND_COMPLETE_MESSAGE
        if type_ == m.DESCRIBE:
            kind, name = m.parse_describe_or_close(body)
            if kind == ord("S"):
                if name not in self.statements:
                    raise _Failed("26000", f'prepared statement "{name}" does not exist')
                return m.parameter_description([]) + m.row_description([("x", 23)])
            if name not in self.portals:
                raise _Failed("34000", f'portal "{name}" does not exist')
            return m.row_description([("x", 23)])
        if type_ == m.EXECUTE:
            portal, _ = m.read_cstring(body, 0)
            if portal not in self.portals:
                raise _Failed("34000", f'portal "{portal}" does not exist')
            return m.data_row(["1"]) + m.command_complete("SELECT 1")
        if type_ == m.CLOSE:
            kind, name = m.parse_describe_or_close(body)
            (self.statements if kind == ord("S") else self.portals).discard(name)
            return m.CLOSE_COMPLETE_MESSAGE
        raise m.ProtocolError(f"invalid frontend message type {type_}")


class _Failed(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.response = _error(sqlstate, message)
