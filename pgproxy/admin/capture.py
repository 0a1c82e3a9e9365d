"""A snapshot of this process, read from the live proxy: pools, clients, servers, listeners.

Owns the one place where the console looks at the proxy's objects (``Proxy.snapshot()`` calls
:func:`take`): which state a client or a server is in, in PgBouncer's terms, what each pool
counts, what is configured. Everything is read when a snapshot is asked for, never kept up
to date on the hot path.

Rules: read only (nothing here changes a connection, a pool or a listener); ids are unique
across worker processes (clients: their virtual PIDs; servers: this process's serial number
spread as virtual PIDs are, below the range virtual PIDs start at), so snapshots merge
exactly; client and server times are converted from the monotonic clock to Unix time once,
here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any, Protocol, cast

from pgproxy import version
from pgproxy.admin.periods import StatsPeriods
from pgproxy.admin.snapshot import (
    ChannelRow,
    ConfigRow,
    DatabaseRow,
    ListenerRow,
    PoolRow,
    Snapshot,
    SocketRow,
    UserRow,
    combine,
)
from pgproxy.backend import ServerConnection
from pgproxy.client import stream
from pgproxy.client.session import ClientSession
from pgproxy.config import CONSOLE_DATABASES, RESTART_FIELDS, WILDCARD, Config, ProxySettings
from pgproxy.config.schema import MASK
from pgproxy.pool.pool import Pool
from pgproxy.pubsub.listener import Listener
from pgproxy.pubsub.registry import ListenerKey

CONSOLE = CONSOLE_DATABASES[0]  # the name the console's rows show, whichever was used
_SERVER_IDS = (1 << 22) - 1  # server ids stay below the first virtual PID
_PEERCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


class ControlState(Protocol):
    """What is read of ``pgproxy.control.Control``: what operators paused or disabled."""

    paused_all: bool
    paused: set[str]
    disabled: set[str]


class ProxyState(Protocol):
    """What is read of ``pgproxy.app.Proxy``."""

    config: Config

    @property
    def control(self) -> ControlState: ...

    pools: dict[tuple[str, str], Pool]
    clients: dict[int, ClientSession]
    listeners: dict[ListenerKey, Listener]
    client_count: int
    periods: StatsPeriods

    @property
    def port(self) -> int: ...

    @property
    def worker(self) -> tuple[int, int]:
        """(index, count) of this process among the workers ((0, 1) without workers)."""
        ...


def take(proxy: ProxyState) -> Snapshot:
    now, mono = time.time(), time.monotonic()
    index, count = proxy.worker
    config = proxy.config

    def wall(monotonic: float) -> float:
        return now - (mono - monotonic)

    def server_id(server: ServerConnection) -> int:
        return 1 + (server.serial * count + index) % _SERVER_IDS

    clients = list(proxy.clients.values())
    # Every pool some client or the proxy holds, keyed as the console shows it: a pool a
    # reload retired is still the pool of the clients that hold it.
    pools: dict[Pool, tuple[str, str]] = {pool: key for key, pool in proxy.pools.items()}
    for client in clients:
        if client.pool is not None:
            pools.setdefault(client.pool, (client.database, client.user))
    linked_to = {id(c.server): c.vpid for c in clients if c.server is not None}

    client_rows = [_client_row(c, proxy.port, wall(c.connected_at), now, mono) for c in clients]
    server_rows: list[SocketRow] = []
    for pool, (database, user) in pools.items():
        for server in (*pool.active, *pool.idle, *pool.parked):
            row = _server_row(server, pool, server_id(server), linked_to.get(id(server), 0))
            row["database"], row["user"] = database, user
            row["connect_time"] = wall(server.created_at)
            row["request_time"] = wall(server.linked_at or server.idle_since)
            server_rows.append(row)
    client_ids = {c.vpid: c for c in clients}
    for row in client_rows:
        linked = client_ids[row["id"]].server
        row["link"] = server_id(linked) if linked is not None else 0
    console = [r for r in client_rows if r["database"] == CONSOLE]

    pool_rows = [_pool_row(pool, key, proxy.periods, client_rows) for pool, key in pools.items()]
    pool_rows = cast(list[PoolRow], combine("pools", [pool_rows]))
    pool_rows.append(_console_pool(len(console)))
    databases = _databases(config, pools, client_rows, proxy.port, proxy.control)
    users = _users(config, pools, client_rows)
    listeners = [_listener_row(key, listener) for key, listener in proxy.listeners.items()]
    channels = [
        ChannelRow(database=db, channel=name, subscribers=len(ch.members),
                   notifications_received=ch.received, notifications_delivered=ch.delivered)
        for (_, db), listener in proxy.listeners.items()
        for name, ch in listener.channels.items()
    ]  # fmt: skip
    return Snapshot(
        version=version(),
        taken_at=now,
        processes=1,
        workers=count,
        stats_period=config.proxy.stats_period,
        paused=int(proxy.control.paused_all),
        pools=sorted(pool_rows, key=lambda r: (r["database"], r["user"])),
        clients=sorted(client_rows, key=lambda r: (r["database"], r["user"], r["id"])),
        servers=sorted(server_rows, key=lambda r: (r["database"], r["user"], r["id"])),
        databases=databases,
        users=users,
        listeners=listeners,
        channels=cast(list[ChannelRow], combine("channels", [channels])),
        lists={
            "databases": len(databases),
            "users": len(users),
            "pools": len(pool_rows),
            "used_clients": proxy.client_count,
            "login_clients": proxy.client_count - len(clients),
            "used_servers": sum(pool.total for pool in pools),
        },
        config=config_rows(config),
    )


# --- connections ------------------------------------------------------------------------------


def _client_row(
    client: ClientSession, port: int, connected: float, now: float, mono: float
) -> SocketRow:
    console = client.mode == stream.ADMIN
    waiting = client.waiting_since()
    server = client.server
    if waiting:
        state, request = "waiting", waiting
    else:
        state = "active" if server is not None else "idle"
        request = server.linked_at if server is not None and server.linked_at else 0.0
    addr, remote_port, local_addr, local_port = _addresses(client.transport, port)
    stmts = client.stmts
    return SocketRow(
        type="C",
        user=client.user,
        database=CONSOLE if console else client.database,
        state=state,
        addr=addr,
        port=remote_port,
        local_addr=local_addr,
        local_port=local_port,
        connect_time=connected,
        request_time=now - (mono - request) if request else connected,
        wait_us=int((mono - waiting) * 1_000_000) if waiting else 0,
        close_needed=0,
        id=client.vpid,
        link=0,  # filled in by take()
        remote_pid=_peer_pid(client.transport) if client.local else 0,
        tls=_tls(client.transport),
        application_name=client.settings.reported.get("application_name", ""),
        prepared_statements=len(stmts.named) if stmts is not None else 0,
    )


def _server_row(server: ServerConnection, pool: Pool, ident: int, link: int) -> SocketRow:
    if server in pool.idle or server in pool.parked:
        state = "idle"
    elif server.client is None and server.busy_internally:
        state = "tested"  # being cleaned (rollback, reset query) before reuse
    else:
        state = "active"
    transport = server.transport
    addr, port, local_addr, local_port = _addresses(transport, pool.database.port)
    return SocketRow(
        type="S", user="", database="", state=state, addr=addr, port=port,
        local_addr=local_addr, local_port=local_port, connect_time=0.0, request_time=0.0,
        wait_us=0, close_needed=int(pool.closing), id=ident, link=link, remote_pid=server.pid,
        tls=_tls(transport), application_name=server.params.get("application_name", ""),
        prepared_statements=len(server.statements),
    )  # fmt: skip


def _addresses(transport: asyncio.BaseTransport | None, port: int) -> tuple[str, int, str, int]:
    """(addr, port, local_addr, local_port); a unix socket shows as "unix" and ``port``."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(peer, tuple) or not isinstance(local, tuple):
        return "unix", port, "unix", port
    return str(peer[0]), int(peer[1]), str(local[0]), int(local[1])


def _peer_pid(transport: asyncio.BaseTransport) -> int:
    """The PID of a unix-socket peer (0 if the kernel will not say)."""
    sock = transport.get_extra_info("socket")
    try:
        return int(_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])
    except (AttributeError, OSError, struct.error):
        return 0


def _tls(transport: asyncio.BaseTransport | None) -> str:
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else ''}"


# --- pools, databases, users ------------------------------------------------------------------


def _pool_row(
    pool: Pool, key: tuple[str, str], periods: StatsPeriods, clients: list[SocketRow]
) -> PoolRow:
    database, user = key
    mine = [c for c in clients if c["database"] == database and c["user"] == user]
    linked = sum(1 for s in pool.active if s.client is not None or not s.busy_internally)
    period, rates = periods.of(pool)
    return PoolRow(
        database=database, user=user,
        cl_active=sum(1 for c in mine if c["state"] != "waiting"),
        cl_waiting=sum(1 for c in mine if c["state"] == "waiting"),
        cl_active_cancel_req=0, cl_waiting_cancel_req=0,
        sv_active=linked, sv_active_cancel=0, sv_being_canceled=0, sv_idle=len(pool.idle),
        sv_used=0, sv_tested=len(pool.active) - linked,
        sv_login=max(0, pool.total - len(pool.active) - len(pool.idle)),
        maxwait_us=max((c["wait_us"] for c in mine), default=0),
        pool_mode=pool.mode, stats=pool.stats.as_dict(), period=period, rates=rates,
    )  # fmt: skip


def _console_pool(clients: int) -> PoolRow:
    """The console's own row, as PgBouncer lists its admin pool (tools skip it by name)."""
    return PoolRow(
        database=CONSOLE, user=CONSOLE, cl_active=clients, cl_waiting=0, cl_active_cancel_req=0,
        cl_waiting_cancel_req=0, sv_active=0, sv_active_cancel=0, sv_being_canceled=0,
        sv_idle=0, sv_used=0, sv_tested=0, sv_login=0, maxwait_us=0, pool_mode="statement",
        stats={}, period={}, rates={},
    )  # fmt: skip


def _databases(
    config: Config,
    pools: Mapping[Pool, tuple[str, str]],
    clients: list[SocketRow],
    port: int,
    control: ControlState,
) -> list[DatabaseRow]:
    """Configured databases, those the "*" entry made for clients (as PgBouncer's automatic
    databases), and the console's."""
    names = {name for name in config.databases if name != WILDCARD}
    names.update(database for database, _ in pools.values())
    lifetime = int(config.proxy.server_lifetime)
    rows = []
    for name in sorted(names):
        db = config.database_for(name)
        if db is None:
            continue
        servers = sum(p.total for p, (d, _) in pools.items() if d == name)
        users = sum(1 for c in clients if c["database"] == name)
        size, least = config.pool_size_for(db, ""), config.min_pool_size_for(db)
        row = _database_row(name, db.host, db.port, db.dbname or name, db.user, size, least,
                            db.pool_mode, lifetime, servers, users)  # fmt: skip
        row["paused"] = int(control.paused_all or name in control.paused)
        row["disabled"] = int(name in control.disabled)
        rows.append(row)
    users = sum(1 for c in clients if c["database"] == CONSOLE)
    rows.append(
        _database_row(CONSOLE, None, port, CONSOLE, CONSOLE, 2, 0, "statement", lifetime, 0, users)
    )
    return sorted(rows, key=lambda r: r["name"])


def _database_row(
    name: str, host: str | None, port: int, database: str, force_user: str | None,
    pool_size: int, min_pool_size: int, pool_mode: str | None, lifetime: int, servers: int,
    clients: int,
) -> DatabaseRow:  # fmt: skip
    return DatabaseRow(
        name=name, host=host, port=port, database=database, force_user=force_user,
        pool_size=pool_size, min_pool_size=min_pool_size, reserve_pool_size=0,
        server_lifetime=lifetime, pool_mode=pool_mode, load_balance_hosts=None,
        max_connections=0, current_connections=servers, max_client_connections=0,
        current_client_connections=clients, paused=0, disabled=0,
    )  # fmt: skip


def _users(
    config: Config, pools: Mapping[Pool, tuple[str, str]], clients: list[SocketRow]
) -> list[UserRow]:
    """Users in [users] and users with a pool."""
    names = set(config.users) | {user for _, user in pools.values()}
    rows = []
    for name in sorted(names):
        user_cfg = config.users.get(name)
        rows.append(
            UserRow(
                name=name,
                pool_size=user_cfg.pool_size if user_cfg is not None else None,
                reserve_pool_size=None,
                pool_mode=user_cfg.pool_mode if user_cfg is not None else None,
                max_user_connections=0,
                current_connections=sum(p.total for p, (_, u) in pools.items() if u == name),
                max_user_client_connections=0,
                current_client_connections=sum(
                    1 for c in clients if c["user"] == name and c["database"] != CONSOLE
                ),
            )
        )
    return rows


# --- LISTEN/NOTIFY ----------------------------------------------------------------------------


def _listener_row(key: ListenerKey, listener: Listener) -> ListenerRow:
    hosts, database = key
    conn = listener.conn
    # The host it is on (of several: the primary it follows), else the first listed.
    host, port = conn.address if conn is not None and not conn.closed else hosts[0]
    return ListenerRow(
        database=database, host=host, port=port, state=listener.state(),
        backend_pid=conn.pid if conn is not None and not conn.closed else None,
        channels=len(listener.channels), subscribers=len(listener.subscriptions),
        notifications_received=listener.notifications,
        notifications_delivered=listener.delivered, notifications_dropped=listener.dropped,
        slow_consumer_disconnects=listener.slow_consumers, reconnects=listener.reconnects,
        last_error=listener.last_error,
    )  # fmt: skip


# --- configuration ----------------------------------------------------------------------------


def config_rows(config: Config) -> list[ConfigRow]:
    """Every setting of [proxy], then those of [databases] and [users] entries; passwords and
    URLs' passwords masked."""
    defaults = ProxySettings()
    proxy = config.proxy
    rows = [
        ConfigRow(key="listen", value=f"{proxy.listen_host}:{proxy.listen_port}",
                  default=f"{defaults.listen_host}:{defaults.listen_port}", changeable="no")
    ]  # fmt: skip
    for f in dataclasses.fields(ProxySettings):
        if f.name in ("listen_host", "listen_port"):
            continue
        rows.append(
            ConfigRow(
                key=f.name,
                value=_text(f.name, getattr(proxy, f.name)),
                default=_text(f.name, getattr(defaults, f.name)),
                changeable="no" if f.name in RESTART_FIELDS else "yes",
            )
        )
    for name, db in sorted(config.databases.items()):
        shown: dict[str, Any] = {
            "url": db.url,  # masked when parsed
            "user": db.user, "password": MASK if db.password else None,
            "pool_size": db.pool_size, "min_pool_size": db.min_pool_size,
            "pool_mode": db.pool_mode, "auth_user": db.auth_user,
        }  # fmt: skip
        rows += _entry_rows(f"databases.{name}", shown)
    for name, user in sorted(config.users.items()):
        shown = {
            "password": MASK if user.password else None,
            "pool_mode": user.pool_mode,
            "pool_size": user.pool_size,
        }
        rows += _entry_rows(f"users.{name}", shown)
    return rows


def _entry_rows(prefix: str, values: Mapping[str, Any]) -> list[ConfigRow]:
    return [
        ConfigRow(key=f"{prefix}.{key}", value=_text(key, value), default="", changeable="yes")
        for key, value in values.items()
        if value is not None
    ]


def _text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    if name == "unix_socket_mode":
        return f"0{value:o}"
    return str(value)
