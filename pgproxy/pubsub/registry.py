"""Which listener serves a pool, and how a listener connection is set up.

Owns the key that makes notifications per upstream database (one listener per host, port and
database name, whichever client database or user reached it) and the listener's own pool of
one: never timed out by the server (PROTOCOL-NOTES 35), named in ``pg_stat_activity``.

Rule: nothing else builds a listener; ``pgproxy.app.Proxy`` keeps them by this key.
"""

from __future__ import annotations

from pgproxy.config import ProxySettings
from pgproxy.pool.pool import Pool, PoolSettings
from pgproxy.pubsub.listener import Listener

ListenerKey = tuple[tuple[tuple[str, int], ...], str]


def listener_key(pool: Pool) -> ListenerKey:
    """Notifications are per upstream database: one listener per (hosts, dbname)."""
    return (pool.database.hosts, pool.upstream_db)


def listener_target(pool: Pool) -> str:
    """The role the listener's server must have. LISTEN works only on a primary, so with
    several hosts (or a URL that asks for one) it follows the primary whatever the pool's
    own target; a lone host is taken as it is (a standby then answers LISTEN with 25006)."""
    if len(pool.database.hosts) > 1 or pool.target in ("primary", "read-write"):
        return "primary"
    return pool.target


def new_listener(pool: Pool, settings: ProxySettings) -> Listener:
    """The listener for the upstream database ``pool`` connects to: a pool of one of its own,
    never timed out by the server (PROTOCOL-NOTES 35), named in pg_stat_activity."""
    pool_settings = PoolSettings(
        size=1,
        min_size=0,
        mode="transaction",
        connect_timeout=settings.server_connect_timeout,
        idle_timeout=0,
        lifetime=0,
        reset_query="",
        tls=pool.settings.tls,
        target_session_attrs=listener_target(pool),
    )
    startup = {
        "application_name": "pgproxy-listener",
        "client_encoding": "UTF8",
        "options": "-c idle_session_timeout=0 -c statement_timeout=0",
    }
    listener_pool = Pool(
        f"listener:{pool.upstream_db}",
        pool.database,
        pool.upstream_db,
        pool.upstream_user,
        pool.password,
        pool_settings,
        startup,
        pass_through=pool.pass_through,
    )
    return Listener(
        listener_pool,
        ping_interval=settings.listener_ping_interval,
        ping_timeout=settings.listener_ping_timeout,
    )
