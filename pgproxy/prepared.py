"""Named prepared statements in transaction mode: client names, server names, server caches.

(A server's cache, :class:`ServerStatements`, also says whose Parse its unnamed statement is,
so that one client's Bind of "" never runs another client's statement.)

Theory of operation. A client's statement ``s1`` is known to the proxy by its Parse body (query
text and parameter types). On servers it lives under a proxy-wide name derived from that body, so
two clients' ``s1`` never collide and identical statements are shared. Before a Bind or
Describe of ``s1`` reaches a server that lacks the statement, the proxy injects its Parse; the
server's ParseComplete for it is swallowed by the :class:`ReplyFilter`, which knows, in order,
which ParseComplete/CloseComplete replies belong to the client and which to the proxy.

Nothing is ever made up in the middle of a server's reply stream:

* a client's Close is forwarded as it is: the server has no statement by the client's name, so it
  answers CloseComplete itself, in the right place (the shared server copy stays cached);
* a Bind/Describe of a name the client never prepared is forwarded as it is, so Postgres raises
  its own 26000 with the client's name and aborts the batch exactly as it would directly;
* a Parse of a name the server already holds is sent as Close + Parse, so the server answers
  ParseComplete itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pgproxy.protocol import messages as m

MAX_CLIENT_STATEMENTS: Final = 10_000  # per client: memory stays bounded whatever a client sends


@dataclass(frozen=True)
class Statement:
    server_name: str
    parse_tail: bytes  # the Parse body after the statement name: query, parameter types
    name_field: bytes  # server_name as it stands in a message: encoded, NUL-terminated

    def parse_message(self) -> bytes:
        return m.message(m.PARSE, self.name_field + self.parse_tail)

    def bind_message(self, client_bind: bytes, name_at: int, rest_at: int) -> bytes:
        """The client's Bind body with this statement's server name in place of the client's
        (which stands between ``name_at`` and ``rest_at``)."""
        return m.message(
            m.BIND, b"".join((client_bind[:name_at], self.name_field, client_bind[rest_at:]))
        )


def statement_for(parse_tail: bytes) -> Statement:
    digest = hashlib.blake2b(parse_tail, digest_size=12).hexdigest()
    server_name = f"pgproxy_{digest}"
    return Statement(server_name, parse_tail, server_name.encode() + b"\0")


# See ServerStatements.unnamed: matches no client's Parse body (compared by identity).
UNNAMED_UNKNOWN = b"unknown unnamed statement"


class ServerStatements:
    """The statements one server holds: the proxy-named ones, least recently used first, and
    which client Parse its unnamed statement came from."""

    __slots__ = ("_names", "limit", "unnamed", "unnamed_unit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: OrderedDict[str, None] = OrderedDict()
        # The Parse body (after the name) of the unnamed statement this server holds, the very
        # object the client that sent it keeps (compared by identity); None if it holds none,
        # UNNAMED_UNKNOWN if an error may have made the server skip what set it. A simple
        # Query destroys it, internal work included. Another client's Bind of "" must never
        # run it. ``unnamed_unit``: the unit of the message that set it (-1: settled), since
        # until that unit is over an earlier error in it may yet skip that message.
        self.unnamed: bytes | None = None
        self.unnamed_unit = -1

    def __contains__(self, name: str) -> bool:
        if name in self._names:
            self._names.move_to_end(name)
            return True
        return False

    def add(self, name: str) -> list[str]:
        """Record ``name``; return the names evicted to stay within the limit."""
        self._names[name] = None
        self._names.move_to_end(name)
        evicted = []
        while len(self._names) > self.limit:
            old, _ = self._names.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, name: str) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        """Forget the named statements (the unnamed one is tracked apart)."""
        self._names.clear()

    def __len__(self) -> int:
        return len(self._names)


ErrorRewrite = Callable[[dict[str, str]], dict[str, str]]


class ReplyFilter:
    """Which ParseComplete/CloseComplete replies go to the client, which the proxy swallows,
    and which server errors must be reworded before the client sees them.

    One entry per Parse or Close sent to the server, in order, tagged with the unit (count of
    ReadyForQuery-producing messages sent before it). After an ErrorResponse the server skips
    the rest of the unit, so that unit's remaining entries are dropped.
    """

    __slots__ = ("entries", "rewrites")

    def __init__(self) -> None:
        # Public so hot loops can test ``replies.entries or replies.rewrites`` (C-level deque
        # truth tests) instead of a Python-level ``__bool__`` call per message.
        self.entries: deque[tuple[int, bool, int]] = deque()  # (reply type, swallow, unit)
        # (text the error message contains, how to reword it, unit), units non-decreasing
        self.rewrites: deque[tuple[str, ErrorRewrite, int]] = deque()

    def expect(self, reply_type: int, swallow: bool, unit: int) -> None:
        self.entries.append((reply_type, swallow, unit))

    def expect_error(self, needle: str, rewrite: ErrorRewrite, unit: int) -> None:
        """An error of ``unit`` whose message contains ``needle`` is the proxy's doing."""
        self.rewrites.append((needle, rewrite, unit))

    def reword(self, fields: dict[str, str], unit: int) -> dict[str, str] | None:
        """The client's version of an error of ``unit`` from the server, or None to pass it
        on as it is."""
        message = fields.get("M", "")
        for needle, rewrite, at in self.rewrites:
            if at > unit:
                break
            if at == unit and needle in message:
                return rewrite(fields)
        return None

    def __bool__(self) -> bool:
        return bool(self.entries) or bool(self.rewrites)

    def reply(self, reply_type: int) -> bool:
        """A ParseComplete/CloseComplete arrived: True if the proxy swallows it."""
        while self.entries:
            expected, swallow, _ = self.entries.popleft()
            if expected == reply_type:
                return swallow
        return False  # nothing expected: not ours to drop

    def error(self, unit: int) -> None:
        while self.entries and self.entries[0][2] <= unit:
            self.entries.popleft()
        self.unit_done(unit)

    def unit_done(self, unit: int) -> None:
        """Units up to ``unit`` are over: their error rewrites can no longer apply."""
        rewrites = self.rewrites
        while rewrites and rewrites[0][2] <= unit:
            rewrites.popleft()

    def clear(self) -> None:
        self.entries.clear()
        self.rewrites.clear()
