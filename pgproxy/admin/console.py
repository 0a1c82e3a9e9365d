"""The admin console's wire side: one session's messages in, its replies out (sans-IO).

Owns the protocol as a server speaks it, for the console's commands: simple Query (each
result: RowDescription, DataRows, CommandComplete; then ReadyForQuery) and the extended
protocol (Parse, Bind, Describe of statements and portals, Execute with a row limit and
PortalSuspended, Close, Sync, Flush), text and binary result formats, so psql, psycopg
(extended by default), asyncpg (Describe, then binary Execute) and psycopg2 all work.

Rules: Postgres' rules, not PgBouncer's (whose console takes simple Query only): after an
error in an extended-protocol message every message is skipped up to the next Sync, which
answers ReadyForQuery; Sync ends the implicit transaction and with it every portal; a simple
Query replaces the unnamed statement. Nothing here does I/O or reads the proxy: ``feed``
returns the bytes to write, and commands reach the proxy through their
:class:`~pgproxy.admin.commands.ConsoleHost`. A command that waits (PAUSE, WAIT_CLOSE) leaves
its awaitable in ``waiting``: the session awaits it and hands the outcome to ``resume``; the
messages after it wait in the buffer meanwhile, so replies stay in order.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from pgproxy.admin import commands
from pgproxy.admin.commands import Command, ConsoleHost, Result
from pgproxy.admin.views import Column, Row
from pgproxy.protocol import errors, extended
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.protocol.framing import check_frontend_header, read_length

# Type OIDs and sizes of the column types (PgBouncer's letters).
_OIDS: Final = {"s": 25, "i": 23, "q": 20, "N": 1700}
_SIZES: Final = {"s": -1, "i": 4, "q": 8, "N": -1}
_BINARY: Final = 1
# No console statement is long: a client that sends more than this in one message is cut off.
_MESSAGE_LIMIT: Final = 1 << 20
_READY: Final = m.ready_for_query(m.IDLE)
_IGNORED: Final = frozenset((m.FLUSH, m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL))  # as Postgres


def greeting(application_name: str) -> dict[str, str]:
    """The ParameterStatus set a console client is sent at login."""
    return {**commands.parameters(), "application_name": application_name}


@dataclass
class _Statement:
    command: Command | None  # None: an empty statement
    oids: tuple[int, ...]  # the parameter types the Parse declared


@dataclass
class _Portal:
    command: Command | None
    formats: list[int]  # one per result column
    result: Result | None = None  # once executed
    sent: int = 0  # rows of it sent so far
    rows: list[Row] = field(default_factory=list)


class Console:
    """One console session: ``feed`` it what the client sent, write what it returns; once
    ``finished`` (Terminate, or a FATAL error), close the connection."""

    def __init__(self, host: ConsoleHost, user: str, role: str) -> None:
        self._host = host
        self.user = user
        self.role = role
        self.finished = False
        self._buf = bytearray()
        self._skipping = False  # an extended-protocol message failed: skip up to Sync
        self._statements: dict[str, _Statement] = {}
        self._portals: dict[str, _Portal] = {}
        # A command being awaited (by the session), what writes its reply, and the message
        # type it came in (errors end a simple Query and skip an extended unit).
        self.waiting: Awaitable[Result] | None = None
        self._finish: Callable[[Result], list[bytes]] | None = None
        self._waiting_type = 0

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        while not self.finished and self.waiting is None and len(buf) >= 5:
            type_, length = buf[0], read_length(buf, 1)
            try:
                check_frontend_header(type_, length)
            except m.ProtocolError as exc:
                self._fail(out, fatal(errors.PROTOCOL_VIOLATION, str(exc)))
                break
            if length > _MESSAGE_LIMIT:
                self._fail(out, fatal(errors.PROGRAM_LIMIT_EXCEEDED, "message too long"))
                break
            if len(buf) < 1 + length:
                break
            body = bytes(buf[5 : 1 + length])
            del buf[: 1 + length]
            self._message(type_, body, out)
        return b"".join(out)

    def _fail(self, out: list[bytes], error: PgError) -> None:
        out.append(m.error_response(error.fields()))
        self.finished = True

    def _message(self, type_: int, body: bytes, out: list[bytes]) -> None:
        if type_ == m.TERMINATE:
            self.finished = True
            return
        if type_ == m.SYNC:
            self._skipping = False
            self._portals.clear()  # the implicit transaction ends, and its portals with it
            out.append(_READY)
            return
        if self._skipping or type_ in _IGNORED:
            return
        try:
            if type_ == m.QUERY:
                self._query(m.parse_query(body), out)
            elif type_ == m.FUNCTION_CALL:
                raise PgError(errors.FEATURE_NOT_SUPPORTED, "the admin console has no functions")
            elif type_ == m.PARSE:
                self._parse(body, out)
            elif type_ == m.BIND:
                self._bind(extended.parse_bind(body), out)
            elif type_ == m.DESCRIBE:
                self._describe(*m.parse_describe_or_close(body), out)
            elif type_ == m.EXECUTE:
                self._execute(*extended.parse_execute(body), out)
            else:  # Close
                kind, name = m.parse_describe_or_close(body)
                (self._statements if kind == ord("S") else self._portals).pop(name, None)
                out.append(m.CLOSE_COMPLETE_MESSAGE)
        except m.ProtocolError as exc:
            self._fail(out, fatal(errors.PROTOCOL_VIOLATION, str(exc)))
        except PgError as exc:
            self._error(type_, exc, out)

    def _error(self, type_: int, exc: PgError, out: list[bytes]) -> None:
        out.append(m.error_response(exc.fields()))
        if type_ == m.QUERY or type_ == m.FUNCTION_CALL:
            out.append(_READY)  # a simple-protocol unit is that one message
        else:
            self._skipping = True

    def _run(
        self, command: Command, type_: int, finish: Callable[[Result], list[bytes]]
    ) -> list[bytes]:
        """Run ``command``; its reply now, or (a command that waits) once ``resume``d."""
        outcome = command.run(self._host, self.role)
        if isinstance(outcome, Result):
            return finish(outcome)
        self.waiting, self._finish, self._waiting_type = outcome, finish, type_
        return []

    def resume(self, outcome: Result | PgError) -> bytes:
        """The awaited command ended: its reply, then what the client sent meanwhile."""
        finish, type_ = self._finish, self._waiting_type
        assert finish is not None
        self.waiting = self._finish = None
        out: list[bytes] = []
        if isinstance(outcome, PgError):
            self._error(type_, outcome, out)
        else:
            out += finish(outcome)
        out.append(self.feed(b""))
        return b"".join(out)

    # --- simple query -----------------------------------------------------------------------

    def _query(self, text: str, out: list[bytes]) -> None:
        self._statements.pop("", None)  # as Postgres: a Query replaces the unnamed statement
        self._portals.pop("", None)
        command = commands.parse(text)
        if command is None:
            out += (m.EMPTY_QUERY_RESPONSE_MESSAGE, _READY)
            return

        def reply(result: Result) -> list[bytes]:
            formats = [0] * len(command.columns or ())
            out = _notices(result)
            if command.columns is not None:
                out.append(_row_description(command.columns, formats))
            out += _data_rows(result.rows or [], command.columns or (), formats)
            return [*out, m.command_complete(result.tag), _READY]

        out += self._run(command, m.QUERY, reply)

    # --- extended query ---------------------------------------------------------------------

    def _parse(self, body: bytes, out: list[bytes]) -> None:
        name, text, oids = m.parse_parse(body)
        if name and name in self._statements:
            raise PgError(
                errors.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{name}" already exists'
            )
        self._statements[name] = _Statement(commands.parse(text), tuple(oids))
        out.append(m.PARSE_COMPLETE_MESSAGE)

    def _statement(self, name: str) -> _Statement:
        statement = self._statements.get(name)
        if statement is None:
            what = f'prepared statement "{name}"' if name else "unnamed prepared statement"
            raise PgError(errors.INVALID_SQL_STATEMENT_NAME, f"{what} does not exist")
        return statement

    def _portal(self, name: str) -> _Portal:
        portal = self._portals.get(name)
        if portal is None:
            raise PgError(errors.INVALID_CURSOR_NAME, f'portal "{name}" does not exist')
        return portal

    def _bind(self, bind: extended.Bind, out: list[bytes]) -> None:
        statement = self._statement(bind.statement)
        if bind.params != len(statement.oids):
            raise PgError(
                errors.PROTOCOL_VIOLATION,
                f"bind message supplies {bind.params} parameters, but prepared statement "
                f'"{bind.statement}" requires {len(statement.oids)}',
            )
        command = statement.command
        formats = _result_formats(bind.formats, len(command.columns or ()) if command else 0)
        if bind.portal and bind.portal in self._portals:
            raise PgError(errors.DUPLICATE_CURSOR, f'portal "{bind.portal}" already exists')
        self._portals[bind.portal] = _Portal(command, formats)
        out.append(m.BIND_COMPLETE_MESSAGE)

    def _describe(self, kind: int, name: str, out: list[bytes]) -> None:
        if kind == ord("S"):
            statement = self._statement(name)
            out.append(m.parameter_description(statement.oids))
            command, formats = statement.command, None
        elif kind == ord("P"):
            portal = self._portal(name)
            command, formats = portal.command, portal.formats
        else:
            raise PgError(errors.PROTOCOL_VIOLATION, f"invalid DESCRIBE message subtype {kind}")
        if command is None or command.columns is None:
            out.append(m.NO_DATA_MESSAGE)
        else:
            out.append(_row_description(command.columns, formats or [0] * len(command.columns)))

    def _execute(self, name: str, max_rows: int, out: list[bytes]) -> None:
        portal = self._portal(name)
        command = portal.command
        if command is None:
            out.append(m.EMPTY_QUERY_RESPONSE_MESSAGE)
            return
        if portal.result is None:

            def first(result: Result) -> list[bytes]:
                portal.result, portal.rows = result, result.rows or []
                return _notices(result) + self._rows(portal, max_rows)

            out += self._run(command, m.EXECUTE, first)
        else:
            out += self._rows(portal, max_rows)

    def _rows(self, portal: _Portal, max_rows: int) -> list[bytes]:
        """The next ``max_rows`` rows of an executed portal (all: 0), and how it stands."""
        command, result = portal.command, portal.result
        assert command is not None and result is not None
        out: list[bytes] = []
        start = portal.sent
        end = len(portal.rows) if max_rows <= 0 else min(len(portal.rows), start + max_rows)
        out += _data_rows(portal.rows[start:end], command.columns or (), portal.formats)
        portal.sent = end
        if result.rows is not None and end < len(portal.rows):
            out.append(m.PORTAL_SUSPENDED_MESSAGE)
        else:
            out.append(m.command_complete(result.tag))
        return out


def _result_formats(codes: Sequence[int], columns: int) -> list[int]:
    """A Bind's result format codes, one per column (Postgres' rules)."""
    for code in codes:
        if code not in (0, _BINARY):
            raise PgError(errors.INVALID_PARAMETER_VALUE, f"unsupported format code: {code}")
    if not codes:
        return [0] * columns
    if len(codes) == 1:
        return [codes[0]] * columns
    if len(codes) != columns:
        raise PgError(
            errors.PROTOCOL_VIOLATION,
            f"bind message has {len(codes)} result formats but query has {columns} columns",
        )
    return list(codes)


def _notices(result: Result) -> list[bytes]:
    return [
        m.error_response(PgError(errors.SUCCESSFUL_COMPLETION, text, severity="NOTICE").fields(),
                         notice=True)
        for text in result.notices
    ]  # fmt: skip


def _row_description(columns: Sequence[Column], formats: Sequence[int]) -> bytes:
    return m.row_description(
        [(c.name, _OIDS[c.type]) for c in columns], [_SIZES[c.type] for c in columns], formats
    )


def _data_rows(
    rows: Sequence[Row], columns: Sequence[Column], formats: Sequence[int]
) -> list[bytes]:
    if not any(formats):
        return [m.data_row([None if v is None else str(v) for v in row]) for row in rows]
    return [
        m.data_row([_binary(v, c.type) if f == _BINARY else _text(v)
                    for v, c, f in zip(row, columns, formats, strict=True)])
        for row in rows
    ]  # fmt: skip


def _text(value: str | int | None) -> str | None:
    return None if value is None else str(value)


def _binary(value: str | int | None, type_: str) -> bytes | None:
    """A value in Postgres' binary format for its column's type."""
    if value is None:
        return None
    if type_ == "s":
        return str(value).encode()
    number = int(value)
    if type_ == "i":
        return struct.pack("!i", number)
    if type_ == "q":
        return struct.pack("!q", number)
    return _numeric(number)


def _numeric(number: int) -> bytes:
    """An integer as a binary numeric: base-10000 digits, most significant first, weight =
    the exponent of the first digit, trailing zero digits left out, display scale 0."""
    digits: list[int] = []
    rest = abs(number)
    while rest:
        rest, digit = divmod(rest, 10000)
        digits.append(digit)
    digits.reverse()
    weight = len(digits) - 1 if digits else 0
    while digits and digits[-1] == 0:
        digits.pop()
    sign = 0x4000 if number < 0 else 0
    return struct.pack(f"!hhHh{len(digits)}h", len(digits), weight, sign, 0, *digits)
