"""What a client's Parse, Bind, Describe and Close become on whichever server it has now.

Owns the client's named prepared statements (client name -> :class:`prepared.Statement`, known
on servers by a proxy-wide name) and the Parse body of its unnamed statement. For each such
message it returns what to send in its place: the message renamed, preceded where the server
lacks the statement by the Parse that recreates it (and the Closes of what that evicts), with
the :class:`~pgproxy.prepared.ReplyFilter` told which replies belong to the proxy. The theory is
in :mod:`pgproxy.prepared`. A statement whose text reads the client's channels
(``pg_listening_channels()``, :mod:`pgproxy.listening_channels`) is sent with them written in;
when they change, the client's name for it maps to the statement with the new list.

Rule: no I/O and no session. It reads and updates only the server's statement records
(``server.statements``, ``server.replies``) and returns bytes for the caller to write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pgproxy import listening_channels, params, prepared
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import fatal

if TYPE_CHECKING:
    from pgproxy.backend import ServerConnection

_S: Final = ord("S")


def _renamer(server_name: str, client_name: str) -> prepared.ErrorRewrite:
    """Reword a server error about a proxy-named statement with the client's name for it."""

    def rename(fields: dict[str, str]) -> dict[str, str]:
        out = dict(fields)
        out["M"] = out["M"].replace(f'"{server_name}"', f'"{client_name}"')
        return out

    return rename


class ClientStatements:
    __slots__ = ("_reading_channels", "named", "unnamed")

    def __init__(self) -> None:
        self.named: dict[str, prepared.Statement] = {}
        # The Parse body (after the name) of the client's unnamed statement; servers compare
        # it by identity to tell whether the unnamed statement they hold is this one.
        self.unnamed: bytes | None = None
        # Statements ("": the unnamed one) whose text holds the client's channels (a call of
        # pg_listening_channels() rewritten), to be written anew when they change: the text
        # and the parameter types of their Parse (None until the first: few clients call it).
        self._reading_channels: dict[str, tuple[listening_channels.Rewritten, bytes]] | None = None

    def parse(self, server: ServerConnection, name: str, tail: bytes) -> bytes | None:
        """A Parse of ``name`` with body ``tail`` (after the name); None: forward as it is."""
        unit = server.flow.sent
        replies = server.replies
        cache = server.statements
        server.stats.server_parse_count += 1  # forwarded, renamed or not
        if self._reading_channels and not (name and name in self.named):
            self._reading_channels.pop(name, None)  # replaced (parse_rewritten puts it back)
        if not name:
            self.unnamed = cache.unnamed = tail
            cache.unnamed_unit = unit
            replies.expect(m.PARSE_COMPLETE, False, unit)
            return None
        stmt = self.named.get(name)
        if stmt is not None:
            # Already exists: make the server raise its own 42P05, in the client's words.
            out = self._ensure(server, stmt, unit)
            replies.expect_error(stmt.server_name, _renamer(stmt.server_name, name), unit)
        else:
            if len(self.named) >= prepared.MAX_CLIENT_STATEMENTS:
                raise fatal(
                    errors.PROGRAM_LIMIT_EXCEEDED,
                    f"too many prepared statements (pgproxy keeps at most "
                    f"{prepared.MAX_CLIENT_STATEMENTS} per client)",
                )
            stmt = self.named[name] = prepared.statement_for(tail)
            if stmt.server_name in cache:
                out = m.close("S", stmt.server_name)  # re-parse: the server answers itself
                replies.expect(m.CLOSE_COMPLETE, True, unit)
            else:
                out = _evict(server, cache.add(stmt.server_name), unit)
        replies.expect(m.PARSE_COMPLETE, False, unit)
        return out + stmt.parse_message()

    def parse_rewritten(
        self,
        server: ServerConnection,
        name: str,
        rewritten: listening_channels.Rewritten,
        parameter_types: bytes,
        channels: list[str],
    ) -> bytes:
        """A Parse of ``name`` whose text reads the client's channels: sent with ``channels``
        written in; from now on the client's ``name`` is the statement holding its current
        channels (:meth:`channels_changed`), so each Bind runs with the list of its time."""
        exists = bool(name) and name in self.named  # then the server raises 42P05
        tail = _with_channels(rewritten, parameter_types, channels)
        out = self.parse(server, name, tail)
        if not exists:
            if self._reading_channels is None:
                self._reading_channels = {}
            self._reading_channels[name] = (rewritten, parameter_types)
        return m.message(m.PARSE, b"\0" + tail) if out is None else out  # None: unnamed

    def channels_changed(self, channels: list[str]) -> None:
        """The client's committed channels changed: its statements that read them become
        statements with the new list (a server that lacks one gets its Parse at the next
        Bind or Describe, as for any statement)."""
        reading = self._reading_channels
        if not reading:
            return
        for name, (rewritten, parameter_types) in list(reading.items()):
            tail = _with_channels(rewritten, parameter_types, channels)
            if name and name in self.named:
                self.named[name] = prepared.statement_for(tail)
            elif not name and self.unnamed is not None:
                self.unnamed = tail
            else:
                del reading[name]  # closed, deallocated or replaced since

    def bind(
        self, server: ServerConnection, body: bytes, name: str, name_at: int, rest_at: int
    ) -> bytes | None:
        """A Bind of statement ``name`` (between ``name_at`` and ``rest_at`` of ``body``)."""
        unit = server.flow.sent
        if not name:
            first = self._ensure_unnamed(server, unit)
            return first + m.message(m.BIND, body) if first else None
        stmt = self.named.get(name)
        if stmt is None:
            return None  # unknown: the server answers (26000) as it would
        return self._ensure(server, stmt, unit) + stmt.bind_message(body, name_at, rest_at)

    def describe(self, server: ServerConnection, body: bytes, name: str) -> bytes | None:
        """A Describe of statement ``name`` (portals need nothing)."""
        unit = server.flow.sent
        if not name:
            first = self._ensure_unnamed(server, unit)
            return first + m.message(m.DESCRIBE, body) if first else None
        stmt = self.named.get(name)
        if stmt is None:
            return None
        return self._ensure(server, stmt, unit) + m.describe("S", stmt.server_name)

    def close(self, server: ServerConnection, kind: int, name: str) -> None:
        """A Close, forwarded as it is: the server knows no statement by the client's name, so
        it answers CloseComplete itself; the shared server copy stays cached."""
        unit = server.flow.sent
        if kind == _S:
            self.named.pop(name, None)
            if not name:
                self.unnamed = None
                server.statements.unnamed, server.statements.unnamed_unit = None, unit
        server.replies.expect(m.CLOSE_COMPLETE, False, unit)

    def deallocate(self, server: ServerConnection, name: str) -> bytes | None:
        """SQL ``DEALLOCATE name`` of a protocol-level statement: the server knows it by its
        proxy-wide name, so it deallocates that. A server that lacks it first gets an empty
        statement under that name: a Parse of the real text could fail (a dropped table) and
        make the server skip the Query, leaving the client without its ReadyForQuery.
        None: not one of this client's statements (the server answers)."""
        stmt = self.named.pop(name, None)
        if stmt is None:
            return None
        unit = server.flow.sent
        out = b""
        if stmt.server_name not in server.statements:
            server.replies.expect(m.PARSE_COMPLETE, True, unit)
            out = m.parse(stmt.server_name, "", [])
        server.statements.discard(stmt.server_name)
        server.replies.expect_error(stmt.server_name, _renamer(stmt.server_name, name), unit)
        return out + m.query("DEALLOCATE " + params.quote_ident(stmt.server_name))

    def _ensure_unnamed(self, server: ServerConnection, unit: int) -> bytes:
        """Before a Bind/Describe of the unnamed statement: make the server's one this
        client's (it may hold another client's, or none, since the last Sync)."""
        tail = self.unnamed
        cache = server.statements
        # Trusted only if set in this unit (skipped together with this message, if at all)
        # or in a unit that is over (an error there would have marked it unknown).
        settled = cache.unnamed_unit == unit or cache.unnamed_unit < server.flow.done
        if settled and cache.unnamed is tail:  # identity: this client's very Parse, or None
            return b""
        cache.unnamed_unit = unit
        if tail is None:
            # The client has none: make sure the server fails as Postgres would (26000).
            server.replies.expect(m.CLOSE_COMPLETE, True, unit)
            cache.unnamed = None
            return m.close("S", "")
        server.replies.expect(m.PARSE_COMPLETE, True, unit)
        server.stats.server_parse_count += 1
        cache.unnamed = tail
        return m.message(m.PARSE, b"\0" + tail)

    @staticmethod
    def _ensure(server: ServerConnection, stmt: prepared.Statement, unit: int) -> bytes:
        """The Parse to inject before using ``stmt`` on ``server``, if it lacks it."""
        if stmt.server_name in server.statements:
            return b""
        out = _evict(server, server.statements.add(stmt.server_name), unit)
        server.replies.expect(m.PARSE_COMPLETE, True, unit)
        server.stats.server_parse_count += 1
        return out + stmt.parse_message()


def _with_channels(
    rewritten: listening_channels.Rewritten, parameter_types: bytes, channels: list[str]
) -> bytes:
    return m.parse_tail(
        rewritten.text(listening_channels.channels_literal(channels)), parameter_types
    )


def _evict(server: ServerConnection, names: list[str], unit: int) -> bytes:
    for _ in names:
        server.replies.expect(m.CLOSE_COMPLETE, True, unit)
    return b"".join(m.close("S", name) for name in names)
