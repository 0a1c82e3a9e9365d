"""Pool upkeep and the real process: warm-up, reaping, reload on SIGHUP, shutdown."""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy, pg_server_url
from tests.support.process import free_port, proxy_process
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, rows_of


def _proxy_backends(pg: PgCluster, app: str = "") -> int:
    """Client backends the proxy holds (those not run by the test's own psql)."""
    return int(
        pg.psql(
            "select count(*) from pg_stat_activity where backend_type = 'client backend'"
            f" and pid <> pg_backend_pid() and application_name = '{app}'"
        )
    )


def _eventually(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll state that offers no event to wait on (the server's view of connections)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_function_call_message_works(proxy: ProxyThread) -> None:
    """FunctionCall ('F'), used by libpq's large-object API, gets its result and ReadyForQuery."""
    with RawClient(proxy.port) as c:
        c.login()
        oid = int(rows_of(c.query("select 'pg_catalog.int4pl'::regproc::oid"))[0][0] or 0)
        args = [struct.pack("!i", 40), struct.pack("!i", 2)]
        body = struct.pack("!ihh", oid, 1, 1)  # one format code for all args: binary
        body += struct.pack("!h", len(args)) + b"".join(struct.pack("!i", 4) + a for a in args)
        body += struct.pack("!h", 1)  # binary result
        c.send(m.message(m.FUNCTION_CALL, body))
        reply = c.read_until_ready()
        assert [t for t, _ in reply] == ["V", "Z"]
        assert reply[0][1] == struct.pack("!i", 4) + struct.pack("!i", 42)
        assert [t for t, _ in c.query("select 1")] == ["T", "D", "C", "Z"]


def test_min_pool_size_warms_up_servers(make_proxy: MakeProxy, pg: PgCluster) -> None:
    url = pg_server_url(pg)
    proxy = make_proxy(databases={"warm": {"url": f"{url}/postgres", "min_pool_size": 2}})
    with psycopg.connect(proxy.dsn(dbname="warm")) as conn:
        conn.execute("select 1")
    _eventually(lambda: proxy.call(lambda p: p.pools[("warm", "postgres")].total) >= 2)


def test_idle_servers_are_reaped(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"server_idle_timeout": 0.5})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        _eventually(lambda: proxy.call(lambda p: p.pools[("postgres", "postgres")].total) == 0)
        assert conn.execute("select 2").fetchone() == (2,)  # a fresh server is opened


def test_servers_past_their_lifetime_are_replaced(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"server_lifetime": 0.3, "default_pool_size": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()
        _eventually(lambda: conn.execute("select pg_backend_pid()").fetchone() != first, timeout=10)


def test_the_real_process_reloads_on_sighup_and_stops_on_sigterm(
    pg: PgCluster, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "pgproxy.toml"
    base = (
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nlog_level = "warning"\n\n'
        f'[databases.main]\nurl = "{pg_server_url(pg)}/postgres"\n'
    )
    config.write_text(base)
    with proxy_process(config, port) as proc:
        dsn = f"postgresql://postgres@127.0.0.1:{port}"
        with psycopg.connect(f"{dsn}/main") as conn:
            assert conn.execute("select current_database()").fetchone() == ("postgres",)
        with pytest.raises(psycopg.OperationalError, match='database "alias" does not exist'):
            psycopg.connect(f"{dsn}/alias")
        config.write_text(base + f'\n[databases.alias]\nurl = "{pg_server_url(pg)}/postgres"\n')
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # the reload happens asynchronously to this test
            try:
                with psycopg.connect(f"{dsn}/alias") as conn:
                    assert conn.execute("select 1").fetchone() == (1,)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "reload did not take effect"
                time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
