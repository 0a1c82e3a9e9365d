"""The SHOW tables: each one's columns (names and types) and its rows, from a snapshot.

Owns what every SHOW command answers. Where PgBouncer has the command, the columns are
PgBouncer 1.26's, by name, order and type (``OPS-CONVENTIONS.md``; its exporters and checks
break on a renamed or an extra column); what is ours has commands of its own (LISTENERS,
CHANNELS). Types are PgBouncer's letters: ``s`` text, ``i`` int4, ``q`` int8, ``N`` numeric;
its timestamps are text, ``YYYY-MM-DD HH:MM:SS TZ`` in local time.

Rule: a pure function of a :class:`~pgproxy.admin.snapshot.Snapshot` (one process's or
several merged), values as Python ``str``/``int``/``None``; encoding them is the console's.
Averages are computed here, from the snapshot's period increases and rates, never stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pgproxy.admin.snapshot import PoolRow, Snapshot, SocketRow
from pgproxy.pool.stats import FIELDS

Value = str | int | None
Row = tuple[Value, ...]


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # "s", "i", "q" or "N"


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: Callable[[Snapshot], list[Row]]


def _columns(spec: str) -> tuple[Column, ...]:
    """``"name:type name:type ..."``."""
    return tuple(Column(*item.split(":")) for item in spec.split())


def _numeric(names: Iterable[str]) -> str:
    return " ".join(f"{name}:N" for name in names)


def timestamp(unix: float) -> str:
    """A time as PgBouncer shows one: local time, whole seconds, the zone's abbreviation."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


def _picked(rows: Iterable[Mapping[str, Any]], columns: tuple[Column, ...]) -> list[Row]:
    """Rows whose fields are named as the columns."""
    return [tuple(row[c.name] for c in columns) for row in rows]


# --- pools ------------------------------------------------------------------------------------

_POOLS: Final = _columns(
    "database:s user:s cl_active:i cl_waiting:i cl_active_cancel_req:i cl_waiting_cancel_req:i "
    "sv_active:i sv_active_cancel:i sv_being_canceled:i sv_idle:i sv_used:i sv_tested:i "
    "sv_login:i maxwait:i maxwait_us:i pool_mode:s load_balance_hosts:s"
)


def _pools(snap: Snapshot) -> list[Row]:
    shown = (
        {**p, "maxwait": p["maxwait_us"] // 1_000_000, "maxwait_us": p["maxwait_us"] % 1_000_000,
         "load_balance_hosts": None}
        for p in snap["pools"]
    )  # fmt: skip
    return _picked(shown, _POOLS)


# --- traffic statistics -----------------------------------------------------------------------

# PoolStats' names as SHOW STATS spells them: totals, then averages.
_TOTAL_NAMES: Final = (
    "total_server_assignment_count", "total_xact_count", "total_query_count", "total_received",
    "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "total_client_parse_count", "total_server_parse_count", "total_bind_count",
    "total_client_login_count",
)  # fmt: skip
_AVERAGE_NAMES: Final = (
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
)  # fmt: skip
# SHOW STATS_AVERAGES keeps PoolStats' names but for the last four.
_AVERAGES_TABLE_NAMES: Final = (*FIELDS[:8], *_AVERAGE_NAMES[8:])
# SHOW TOTALS' row names: PgBouncer's counter names (after "total_" / "avg_").
_TOTALS_ROW_NAMES: Final = (
    "server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
    "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
    "ps_bind_count", "client_login_count",
)  # fmt: skip
# Times are averaged per unit of what they measure, the rest are rates per second.
_PER: Final = {
    "xact_time": "xact_count",
    "query_time": "query_count",
    "wait_time": "server_assignment_count",
}


def averages(period: Mapping[str, int], rates: Mapping[str, float]) -> list[int]:
    """PgBouncer's averages, in PoolStats order: counts and bytes per second, times in µs per
    transaction, query and server assignment, over the last complete stats_period."""
    out = []
    for name in FIELDS:
        per = _PER.get(name)
        if per is None:
            out.append(int(rates.get(name, 0)))
        else:
            units = period.get(per, 0)
            out.append(period.get(name, 0) // units if units else 0)
    return out


def _by_database(
    pools: Iterable[PoolRow], everything: bool = False
) -> dict[str, tuple[dict[str, Any], ...]]:
    """Per database, sorted (or all as one, under ""): its pools' totals, period increases
    and rates, added up."""
    out: dict[str, tuple[dict[str, Any], ...]] = {}
    for pool in pools:
        sums = out.setdefault("" if everything else pool["database"], ({}, {}, {}))
        parts: tuple[Mapping[str, Any], ...] = (pool["stats"], pool["period"], pool["rates"])
        for into, part in zip(sums, parts, strict=True):
            for name, value in part.items():
                into[name] = into.get(name, 0) + value
    return dict(sorted(out.items()))


def _totals(stats: Mapping[str, int]) -> list[int]:
    return [stats.get(name, 0) for name in FIELDS]


def _stats(snap: Snapshot) -> list[Row]:
    return [
        (db, *_totals(stats), *averages(period, rates))
        for db, (stats, period, rates) in _by_database(snap["pools"]).items()
    ]


def _stats_totals(snap: Snapshot) -> list[Row]:
    return [(db, *_totals(stats)) for db, (stats, _, _) in _by_database(snap["pools"]).items()]


def _stats_averages(snap: Snapshot) -> list[Row]:
    return [
        (db, *averages(period, rates))
        for db, (_, period, rates) in _by_database(snap["pools"]).items()
    ]


def _totals_table(snap: Snapshot) -> list[Row]:
    stats, period, rates = _by_database(snap["pools"], everything=True).get("", ({}, {}, {}))
    rows: list[Row] = [
        (f"total_{n}", v) for n, v in zip(_TOTALS_ROW_NAMES, _totals(stats), strict=True)
    ]
    averaged = averages(period, rates)
    return rows + [(f"avg_{n}", v) for n, v in zip(_TOTALS_ROW_NAMES, averaged, strict=True)]


# --- connections ------------------------------------------------------------------------------

_SOCKETS: Final = _columns(
    "type:s user:s database:s replication:s state:s addr:s port:i local_addr:s local_port:i "
    "connect_time:s request_time:s wait:i wait_us:i close_needed:i ptr:s link:s remote_pid:i "
    "tls:s application_name:s prepared_statements:i id:i"
)


def pointer(ident: int) -> str:
    """The ``ptr``/``link`` text of a client or server id (PgBouncer shows an address)."""
    return f"0x{ident:x}"


def _socket_rows(rows: Iterable[SocketRow]) -> list[Row]:
    shown = (
        {**r, "replication": "none", "connect_time": timestamp(r["connect_time"]),
         "request_time": timestamp(r["request_time"]), "wait": r["wait_us"] // 1_000_000,
         "wait_us": r["wait_us"] % 1_000_000, "ptr": pointer(r["id"]),
         "link": pointer(r["link"]) if r["link"] else ""}
        for r in rows
    )  # fmt: skip
    return _picked(shown, _SOCKETS)


# --- configuration objects --------------------------------------------------------------------

_DATABASES: Final = _columns(
    "name:s host:s port:i database:s force_user:s pool_size:i min_pool_size:i "
    "reserve_pool_size:i server_lifetime:i pool_mode:s load_balance_hosts:s max_connections:i "
    "current_connections:i max_client_connections:i current_client_connections:i paused:i "
    "disabled:i"
)
_USERS: Final = _columns(
    "name:s pool_size:s reserve_pool_size:s pool_mode:s max_user_connections:i "
    "current_connections:i max_user_client_connections:i current_client_connections:i"
)


def _users(snap: Snapshot) -> list[Row]:
    def text(size: int | None) -> str:
        return "" if size is None else str(size)

    shown = (
        {**u, "pool_size": text(u["pool_size"]), "reserve_pool_size": text(u["reserve_pool_size"])}
        for u in snap["users"]
    )
    return _picked(shown, _USERS)


# --- LISTEN/NOTIFY (ours) ---------------------------------------------------------------------

_LISTENERS: Final = _columns(
    "database:s host:s port:i state:s backend_pid:i channels:i subscribers:i "
    "notifications_received:q notifications_delivered:q notifications_dropped:q "
    "slow_consumer_disconnects:q reconnects:q last_error:s"
)
_CHANNELS: Final = _columns(
    "database:s channel:s subscribers:i notifications_received:q notifications_delivered:q"
)


def _listeners(snap: Snapshot) -> list[Row]:
    rows = sorted(snap["listeners"], key=lambda r: (r["database"], r["host"], r["port"]))
    return _picked(rows, _LISTENERS)


# --- the process ------------------------------------------------------------------------------

_CONFIG: Final = _columns("key:s value:s default:s changeable:s")
_LISTS: Final = (
    "databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients",
    "login_clients", "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries",
    "dns_pending",
)  # fmt: skip


def _state(snap: Snapshot) -> list[Row]:
    paused = snap["paused"]
    return [("active", "no" if paused else "yes"), ("paused", "yes" if paused else "no"),
            ("suspended", "no")]  # fmt: skip


TABLES: Final[dict[str, Table]] = {
    "pools": Table(_POOLS, _pools),
    "stats": Table(
        _columns(f"database:s {_numeric(_TOTAL_NAMES)} {_numeric(_AVERAGE_NAMES)}"), _stats
    ),
    "stats_totals": Table(_columns(f"database:s {_numeric(FIELDS)}"), _stats_totals),
    "stats_averages": Table(
        _columns(f"database:s {_numeric(_AVERAGES_TABLE_NAMES)}"), _stats_averages
    ),
    "totals": Table(_columns("name:s value:N"), _totals_table),
    "clients": Table(_SOCKETS, lambda snap: _socket_rows(snap["clients"])),
    "servers": Table(_SOCKETS, lambda snap: _socket_rows(snap["servers"])),
    "databases": Table(_DATABASES, lambda snap: _picked(snap["databases"], _DATABASES)),
    "users": Table(_USERS, _users),
    "lists": Table(
        _columns("list:s items:i"), lambda snap: [(n, snap["lists"].get(n, 0)) for n in _LISTS]
    ),
    "config": Table(_CONFIG, lambda snap: _picked(snap["config"], _CONFIG)),
    "version": Table(_columns("version:s"), lambda snap: [(f"pgproxy {snap['version']}",)]),
    "state": Table(_columns("key:s value:s"), _state),
    "listeners": Table(_LISTENERS, _listeners),
    "channels": Table(_CHANNELS, lambda snap: _picked(snap["channels"], _CHANNELS)),
}
