"""What the admin console shows, as data: a snapshot of one process, and several merged.

Owns the snapshot's shape (the TypedDicts below: plain dicts of str, int, float and None, so
``json.dumps`` takes one as it is and another process can send it over a socket) and
:func:`merge`, which combines the snapshots of several processes (``workers = N``) into the
one a single process with all their pools, clients and servers would have taken.

Rule: merging is exact. Every figure is either a count or a sum (added), a maximum (the
longest wait), a setting (the same everywhere: the first is kept), a row of its own (a
client, a server, a listener connection: concatenated, with ids unique across processes, as
virtual PIDs are), or how many rows a merged table has (SHOW LISTS' databases, users and
pools: every process has them, so they are counted again). Averages are never stored, only
what they are computed from (a period's increases, and rates per second, which add up across
processes), so ``views`` derives them the same way from one snapshot or a merged one. This
module imports nothing of pgproxy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, cast


class PoolRow(TypedDict):
    database: str
    user: str
    cl_active: int  # logged in, linked to a server or idle
    cl_waiting: int  # waiting for a server
    cl_active_cancel_req: int
    cl_waiting_cancel_req: int
    sv_active: int  # linked to a client
    sv_active_cancel: int
    sv_being_canceled: int
    sv_idle: int
    sv_used: int
    sv_tested: int  # running the proxy's own cleanup (rollback, reset query)
    sv_login: int  # being connected
    maxwait_us: int  # how long the oldest waiting client has waited
    pool_mode: str
    stats: dict[str, int]  # PoolStats totals since the pool was made
    period: dict[str, int]  # their increase over the last complete stats_period
    rates: dict[str, float]  # that increase per second


class SocketRow(TypedDict):
    """A client (``type`` C) or a server (S), as SHOW CLIENTS and SHOW SERVERS list them."""

    type: str
    user: str
    database: str
    state: str
    addr: str
    port: int
    local_addr: str
    local_port: int
    connect_time: float  # Unix time
    request_time: float
    wait_us: int
    close_needed: int
    id: int  # unique across processes
    link: int  # the id of the linked peer (0: none)
    remote_pid: int
    tls: str
    application_name: str
    prepared_statements: int


class DatabaseRow(TypedDict):
    name: str
    host: str | None
    port: int
    database: str
    force_user: str | None
    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    server_lifetime: int
    pool_mode: str | None
    load_balance_hosts: str | None
    max_connections: int
    current_connections: int
    max_client_connections: int
    current_client_connections: int
    paused: int
    disabled: int


class UserRow(TypedDict):
    name: str
    pool_size: int | None  # None: not set for this user
    reserve_pool_size: int | None
    pool_mode: str | None
    max_user_connections: int
    current_connections: int
    max_user_client_connections: int
    current_client_connections: int


class ListenerRow(TypedDict):
    """One listener connection (per upstream database and process)."""

    database: str
    host: str
    port: int
    state: str
    backend_pid: int | None
    channels: int
    subscribers: int
    notifications_received: int
    notifications_delivered: int
    notifications_dropped: int  # never reached a subscriber: held ones discarded, ...
    slow_consumer_disconnects: int
    reconnects: int
    last_error: str | None


class ChannelRow(TypedDict):
    database: str
    channel: str
    subscribers: int
    notifications_received: int
    notifications_delivered: int


class ConfigRow(TypedDict):
    key: str
    value: str
    default: str
    changeable: str


class Snapshot(TypedDict):
    version: str
    taken_at: float  # Unix time
    processes: int  # whose figures these are (merged: the workers that answered)
    workers: int  # how many worker processes the proxy has (1: no workers)
    stats_period: int
    paused: int
    pools: list[PoolRow]
    clients: list[SocketRow]
    servers: list[SocketRow]
    databases: list[DatabaseRow]
    users: list[UserRow]
    listeners: list[ListenerRow]
    channels: list[ChannelRow]
    lists: dict[str, int]
    config: list[ConfigRow]


# How rows of the same thing (same key) from different processes combine: the fields added
# (counts, sums; dicts are added key by key) and those of which the largest is kept. Other
# fields are settings, the same everywhere, and the first is kept.
_POOL_COUNTS = (
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active",
    "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
)  # fmt: skip
_DATABASE_COUNTS = (
    "pool_size", "min_pool_size", "reserve_pool_size", "max_connections", "current_connections",
    "max_client_connections", "current_client_connections",
)  # fmt: skip
_USER_COUNTS = (
    "pool_size", "reserve_pool_size", "max_user_connections", "current_connections",
    "max_user_client_connections", "current_client_connections",
)  # fmt: skip
_CHANNEL_COUNTS = ("subscribers", "notifications_received", "notifications_delivered")
# table -> (key fields, added fields, fields of which the largest is kept)
_MERGED: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "pools": (("database", "user"), (*_POOL_COUNTS, "stats", "period", "rates"), ("maxwait_us",)),
    "databases": (("name",), _DATABASE_COUNTS, ("paused", "disabled")),
    "users": (("name",), _USER_COUNTS, ()),
    "channels": (("database", "channel"), _CHANNEL_COUNTS, ()),
}


def merge(snapshots: Sequence[Snapshot]) -> Snapshot:
    """The snapshot one process holding everything the given processes hold would take."""
    if not snapshots:
        raise ValueError("no snapshot to merge")
    first = snapshots[0]
    pools = cast(list[PoolRow], combine("pools", [s["pools"] for s in snapshots]))
    databases = cast(list[DatabaseRow], combine("databases", [s["databases"] for s in snapshots]))
    users = cast(list[UserRow], combine("users", [s["users"] for s in snapshots]))
    # Counts of connections add up; counts of things every process has are the merged ones'.
    lists = _add_dicts(s["lists"] for s in snapshots)
    lists.update(databases=len(databases), users=len(users), pools=len(pools))
    return Snapshot(
        version=first["version"],
        taken_at=max(s["taken_at"] for s in snapshots),
        processes=sum(s["processes"] for s in snapshots),
        workers=first["workers"],
        stats_period=first["stats_period"],
        paused=max(s["paused"] for s in snapshots),
        pools=pools,
        clients=sorted((r for s in snapshots for r in s["clients"]), key=_socket_order),
        servers=sorted((r for s in snapshots for r in s["servers"]), key=_socket_order),
        databases=databases,
        users=users,
        listeners=[r for s in snapshots for r in s["listeners"]],
        channels=cast(list[ChannelRow], combine("channels", [s["channels"] for s in snapshots])),
        lists=lists,
        config=first["config"],
    )


def combine(table: str, tables: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of ``table`` ("pools", "databases", "users" or "channels") from several sources,
    one row per key, sorted by key. Also used within one process: a pool retired by a reload
    and its successor are one pool to the console."""
    key_fields, added, largest = _MERGED[table]
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for source in tables:
        for row in source:
            key = tuple(row[k] for k in key_fields)
            into = rows.get(key)
            if into is None:
                rows[key] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in row.items()}
                continue
            for name in added:
                into[name] = _add(into[name], row[name])
            for name in largest:
                into[name] = max(into[name], row[name])
    return [rows[key] for key in sorted(rows)]


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return _add_dicts((a, b))
    if a is None or b is None:
        return b if a is None else a
    return a + b


def _add_dicts(dicts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _socket_order(row: SocketRow) -> tuple[str, str, int]:
    return (row["database"], row["user"], row["id"])
