"""A pool's traffic counters, as PgBouncer's SHOW STATS_TOTALS defines them.

Owns the running totals for one pool since it was created. They are bumped where the work
happens anyway, on objects that exist anyway: a server holds its pool's :class:`PoolStats`
and adds a transaction's figures once, when it is released (``Pool.release``); a client adds
its bytes when it forwards them. Averages are never kept here: the console and metrics derive
them from two readings ``stats_period`` apart (``averages``).

Rule: fields only ever increased; nothing here reads a clock. Times are kept as float seconds
(the hot path adds differences of clock readings, with no conversion) and shown as µs
integers by :meth:`PoolStats.as_dict`, the one reading everyone uses.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    __slots__ = (
        "bind_count",
        "bytes_received",
        "bytes_sent",
        "client_login_count",
        "client_parse_count",
        "idle_in_transaction_seconds",
        "more_queries",
        "more_xacts",
        "server_assignment_count",
        "server_parse_count",
        "wait_seconds",
        "xact_seconds",
    )

    def __init__(self) -> None:
        self.server_assignment_count = 0  # a client got a server
        # Queries (units answered: ReadyForQuery, as PgBouncer counts them) and transactions
        # (ReadyForQuery I) beyond one of each per assignment, the common case: they are
        # counted as the assignments' and these, so that it costs one write, not three.
        self.more_queries = 0
        self.more_xacts = 0
        self.bytes_received = 0  # from clients, forwarded to servers
        self.bytes_sent = 0  # from servers, forwarded to clients
        self.xact_seconds = 0.0  # a server spent linked to a client (transaction mode)
        self.idle_in_transaction_seconds = 0.0  # of that, its client idle in a transaction
        self.wait_seconds = 0.0  # clients waited for a server
        self.client_parse_count = 0  # Parse messages from clients
        self.server_parse_count = 0  # Parse messages the proxy sent servers
        self.bind_count = 0  # Bind messages from clients
        self.client_login_count = 0  # logins completed

    def as_dict(self) -> dict[str, int]:
        """The totals under PgBouncer's names, times in µs."""
        return {
            "server_assignment_count": self.server_assignment_count,
            "xact_count": self.server_assignment_count + self.more_xacts,
            "query_count": self.server_assignment_count + self.more_queries,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "xact_time": int(self.xact_seconds * 1_000_000),
            # Both added at the same release, so this never decreases.
            "query_time": int((self.xact_seconds - self.idle_in_transaction_seconds) * 1_000_000),
            "wait_time": int(self.wait_seconds * 1_000_000),
            "client_parse_count": self.client_parse_count,
            "server_parse_count": self.server_parse_count,
            "bind_count": self.bind_count,
            "client_login_count": self.client_login_count,
        }


def averages(new: Mapping[str, int], old: Mapping[str, int], seconds: float) -> dict[str, int]:
    """PgBouncer's averages between two readings ``seconds`` apart (its ``calc_average``):
    counts and bytes per second; ``xact_time`` and ``query_time`` µs per transaction and per
    query, ``wait_time`` µs per server assignment; integers, rounded down."""
    delta = {name: new[name] - old[name] for name in FIELDS}
    out = {name: int(delta[name] / seconds) if seconds > 0 else 0 for name in FIELDS}
    for time_field, per in _TIME_PER:
        out[time_field] = delta[time_field] // delta[per] if delta[per] > 0 else 0
    return out


_TIME_PER: Final = (
    ("xact_time", "xact_count"),
    ("query_time", "query_count"),
    ("wait_time", "server_assignment_count"),
)
