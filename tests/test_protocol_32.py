"""Protocol 3.2 towards clients, through libpq 18 (psycopg's binary wheel carries it): the
connection speaks 3.2, gets a 32-byte cancel key, and cancelling with it works, also when the
cancel reaches another worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from pgproxy.testing.cluster import PgCluster
from tests.conftest import pg_server_url
from tests.support.process import free_port, proxy_process
from tests.support.proxy_runner import ProxyThread

pytestmark = pytest.mark.skipif(
    psycopg.pq.version() < 180000, reason="protocol 3.2 needs libpq 18 (psycopg[binary] >= 3.2.9)"
)


def _running(pg: PgCluster) -> bool:
    return (
        pg.psql(
            "select count(*) from pg_stat_activity where state = 'active'"
            " and query = 'select pg_sleep(30)'"
        )
        == "1"
    )


def _cancel_a_sleep(conn: psycopg.Connection, pg: PgCluster) -> None:
    """Start a long query, cancel it with the connection's key, expect 57014 quickly."""
    cancelled: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("select pg_sleep(30)")
        except BaseException as exc:
            cancelled.append(exc)

    thread = threading.Thread(target=sleep)
    started = time.monotonic()
    thread.start()
    deadline = time.monotonic() + 10
    while not _running(pg):  # the query must be running upstream for the cancel to hit it
        assert time.monotonic() < deadline, "the query never started"
        time.sleep(0.05)
    conn.cancel_safe()
    thread.join(20)
    assert cancelled and isinstance(cancelled[0], pg_errors.QueryCanceled)
    assert time.monotonic() - started < 10


def test_libpq_18_speaks_3_2_and_cancels_with_the_long_key(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, max_protocol_version="3.2") as conn:
        assert conn.info.full_protocol_version == 30002
        assert conn.execute("select 1").fetchone() == (1,)
        _cancel_a_sleep(conn, pg)
        assert conn.execute("select 2").fetchone() == (2,)
    with psycopg.connect(proxy.dsn(), autocommit=True, max_protocol_version="3.0") as old:
        assert old.info.full_protocol_version == 30000
        _cancel_a_sleep(old, pg)


def test_a_3_2_cancel_is_routed_to_the_clients_worker(pg: PgCluster, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "p.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 2\nlog_level = "warning"\n'
        f'[databases.main]\nurl = "{pg_server_url(pg)}/postgres"\n'
    )
    with proxy_process(config, port):
        dsn = f"postgresql://postgres@127.0.0.1:{port}/main"
        for _ in range(4):  # the cancel's connection lands on either worker
            with psycopg.connect(dsn, autocommit=True, max_protocol_version="3.2") as conn:
                _cancel_a_sleep(conn, pg)


def test_upstream_speaks_3_2_where_the_server_does(proxy: ProxyThread, pg: PgCluster) -> None:
    """PostgreSQL 18 gives the proxy's servers 32-byte cancel keys; 15 negotiates 3.0 and
    4 bytes (scripts/test runs this module against both)."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    lengths = proxy.call(
        lambda p: {len(s.secret) for pool in p.pools.values() for s in (*pool.idle, *pool.active)}
    )
    major = int(pg.psql("show server_version").split(".")[0])
    assert lengths == {32 if major >= 18 else 4}
