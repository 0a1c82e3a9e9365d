"""The listener's upstream connection: its socket options and its LISTEN statements.

Owns what a listener connection needs beyond a pooled server's: TCP keepalive and
TCP_USER_TIMEOUT (a listener only reads, so a silently dead connection must be noticed by the
kernel too), and running LISTEN with the one retry a stale notification queue calls for.

Rule: no state; the listener (pgproxy.pubsub.listener) decides when each is used.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from pgproxy.backend import ServerConnection
from pgproxy.params import quote_ident
from pgproxy.wire import log

__all__ = ["STALE_QUEUE", "enable_keepalive", "listen_all", "run_listen"]

# TCP keepalive for the listener socket: the kernel probes an idle connection, and
# TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged (PROTOCOL-NOTES 35).
_KEEPALIVE_IDLE = 30
_KEEPALIVE_INTERVAL = 10
_KEEPALIVE_COUNT = 3
_USER_TIMEOUT_MS = 60_000


def enable_keepalive(conn: ServerConnection) -> None:
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), _KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), _KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), _KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), _USER_TIMEOUT_MS),
    ]
    for level, name, value in options:
        if name is None:
            continue  # not on this platform
        try:
            sock.setsockopt(level, name, value)
        except OSError as exc:
            log.debug("listener socket option %s not set: %s", name, exc)


# LISTEN reads the queue from its tail; entries of transactions whose commit status is gone
# (truncated pg_xact) make it fail so. pg_notification_queue_usage() advances the tail past them
# (async.c), so one retry after it succeeds, as PostgREST does.
STALE_QUEUE = "could not access status of transaction"


async def run_listen(conn: ServerConnection, sql: str) -> None:
    """Run LISTEN statements on the listener connection; raises PgError if they fail."""
    result = await conn.run_internal(sql)
    if result.error is not None and STALE_QUEUE in result.error.message:
        log.warning("LISTEN failed (%s); advancing the queue tail, retrying", result.error.message)
        await conn.run_internal("SELECT pg_catalog.pg_notification_queue_usage()")
        result = await conn.run_internal(sql)
    if result.error is not None:
        raise result.error


def listen_all(names: Iterable[str]) -> str:
    return "; ".join(f"LISTEN {quote_ident(n)}" for n in names)
