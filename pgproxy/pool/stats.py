"""A pool's traffic counters, as PgBouncer's SHOW STATS_TOTALS defines them (times in µs).

Owns the running totals for one pool since it was created. They are bumped where the work
happens anyway, on objects that exist anyway: a server holds its pool's :class:`PoolStats`
and adds a transaction's figures once, when it is released (``Pool.release``); a client adds
its bytes when it forwards them. Averages are never kept here: the console and metrics derive
them from two readings ``stats_period`` apart.

Rule: plain integer fields, only ever increased; nothing here reads a clock.
"""

from __future__ import annotations

from typing import Final

# The names, in SHOW STATS_TOTALS order (after ``database``).
FIELDS: Final = (
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
    "client_login_count",
)


class PoolStats:
    __slots__ = FIELDS

    def __init__(self) -> None:
        self.server_assignment_count = 0  # a client got a server
        self.xact_count = 0  # transactions ended (ReadyForQuery I after a unit)
        self.query_count = 0  # units answered (ReadyForQuery), as PgBouncer counts queries
        self.bytes_received = 0  # from clients, forwarded to servers
        self.bytes_sent = 0  # from servers, forwarded to clients
        self.xact_time = 0  # µs a server spent linked to a client (transaction mode)
        self.query_time = 0  # µs of that not spent idle in a transaction
        self.wait_time = 0  # µs clients waited for a server
        self.client_parse_count = 0  # Parse messages from clients
        self.server_parse_count = 0  # Parse messages the proxy sent servers
        self.bind_count = 0  # Bind messages from clients
        self.client_login_count = 0  # logins completed

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in FIELDS}
