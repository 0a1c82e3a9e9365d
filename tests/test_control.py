"""Operator commands on a running proxy: PAUSE/RESUME, RECONNECT, WAIT_CLOSE, KILL,
KILL_CLIENT, DISABLE/ENABLE and the declarative ``paused`` setting. Real Postgres, psycopg."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future

import psycopg
import pytest

from pgproxy.config import parse_config
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy, build_config
from tests.support.proxy_runner import ProxyThread


def _in_thread(fn: Callable[[], object]) -> Future[object]:
    """Run ``fn`` in a thread; its Future completes with what it returns or raises."""
    fut: Future[object] = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def _query(proxy: ProxyThread, sql: str = "select 1") -> Callable[[], object]:
    def run() -> object:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            return conn.execute(sql).fetchone()

    return run


def _waiting(proxy: ProxyThread) -> int:
    return int(proxy.call(lambda p: sum(len(pool.waiters) for pool in p.pools.values())))


def _until_waiting(proxy: ProxyThread, count: int) -> None:
    """A client queued in the pool is an event the proxy only exposes as state: poll it."""
    import time

    deadline = time.monotonic() + 10
    while _waiting(proxy) < count:
        assert time.monotonic() < deadline, "no client is waiting"
        time.sleep(0.02)


def test_pause_waits_for_the_open_transaction_then_holds_new_ones_until_resume(
    make_proxy: MakeProxy,
) -> None:
    # query_wait_timeout shorter than the pause: a held client must not time out.
    proxy = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 0.5})
    with psycopg.connect(proxy.dsn()) as busy:
        busy.execute("select 1")  # holds the only server, in a transaction
        paused = _in_thread(lambda: proxy.call(lambda p: p.control.pause(), timeout=30))
        later = _in_thread(_query(proxy))
        _until_waiting(proxy, 1)
        assert not paused.done()  # PAUSE waits for the transaction in flight
        busy.commit()
        paused.result(10)
        assert not later.done()
        import time

        time.sleep(1.0)  # twice query_wait_timeout: the held client's clock is stopped
        assert not later.done()
        proxy.call(lambda p: p.control.resume())
        assert later.result(10) == (1,)


def test_pause_of_one_database_leaves_the_others_serving(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    proxy = make_proxy()
    assert _query(proxy)() == (1,)
    proxy.call(lambda p: p.control.pause("postgres"), timeout=10)
    held = _in_thread(_query(proxy))
    with psycopg.connect(proxy.dsn(dbname="template1"), autocommit=True) as other:
        assert other.execute("select 1").fetchone() == (1,)
    assert not held.done()
    proxy.call(lambda p: p.control.resume("postgres"))
    assert held.result(10) == (1,)


def test_reconnect_replaces_every_server_as_it_comes_free(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 2})
    with psycopg.connect(proxy.dsn()) as busy:
        old_busy = busy.execute("select pg_backend_pid()").fetchone()
        idle_pid = _query(proxy, "select pg_backend_pid()")()
        proxy.call(lambda p: p.control.reconnect())
        closing = _in_thread(lambda: proxy.call(lambda p: p.control.wait_close(), timeout=30))
        assert not closing.done()  # the busy server is still in its transaction
        assert busy.execute("select pg_backend_pid()").fetchone() == old_busy
        busy.commit()
        closing.result(10)
    fresh = {_query(proxy, "select pg_backend_pid()")() for _ in range(3)}
    assert old_busy not in fresh and idle_pid not in fresh


def test_kill_closes_clients_and_holds_new_ones_until_resume(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        conn.execute("select 1")
        assert proxy.call(lambda p: p.control.kill("postgres")) == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()
    held = _in_thread(_query(proxy))
    _until_waiting(proxy, 1)
    proxy.call(lambda p: p.control.resume())
    assert held.result(10) == (1,)


def test_kill_client_closes_that_client_only(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        assert proxy.call(lambda p: p.control.kill_client(a.info.backend_pid))
        with pytest.raises(psycopg.OperationalError):
            a.execute("select 1")
        assert b.execute("select 1").fetchone() == (1,)
        assert not proxy.call(lambda p: p.control.kill_client(1))


def test_disable_refuses_new_clients_and_enable_lets_them_in(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(), autocommit=True) as current:
        proxy.call(lambda p: p.control.disable("postgres"))
        with pytest.raises(psycopg.OperationalError, match='database "postgres" is disabled'):
            psycopg.connect(proxy.dsn())
        assert current.execute("select 1").fetchone() == (1,)  # those in carry on
        proxy.call(lambda p: p.control.enable("postgres"))
        assert _query(proxy)() == (1,)


def test_paused_setting_pauses_and_resumes_on_reload(make_proxy: MakeProxy, pg: PgCluster) -> None:
    proxy = make_proxy(proxy={"paused": True})
    held = _in_thread(_query(proxy))
    _until_waiting(proxy, 1)
    proxy.call(lambda p: p.reload(parse_config(build_config(pg, proxy={"paused": False}))))
    assert held.result(10) == (1,)


# --- the same through the admin console --------------------------------------------------------


def _console(proxy: ProxyThread) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True)


def test_console_pause_answers_once_the_transaction_ends_and_show_tells(
    make_proxy: MakeProxy,
) -> None:
    proxy = make_proxy(proxy={"admin_users": ["postgres"], "default_pool_size": 1})
    with psycopg.connect(proxy.dsn()) as busy, _console(proxy) as console:
        busy.execute("select 1")
        paused = _in_thread(lambda: _console(proxy).execute("PAUSE postgres").statusmessage)
        held = _in_thread(_query(proxy))
        _until_waiting(proxy, 1)
        assert not paused.done()
        busy.commit()
        assert paused.result(10) == "PAUSE"
        databases = {r[0]: r for r in console.execute("SHOW DATABASES").fetchall()}
        columns = [c.name for c in console.execute("SHOW DATABASES").description or ()]
        assert databases["postgres"][columns.index("paused")] == 1
        assert not held.done()
        console.execute("RESUME postgres")
        assert held.result(10) == (1,)
        console.execute("PAUSE")
        assert ("paused", "yes") in console.execute("SHOW STATE").fetchall()
        console.execute("RESUME")
        assert ("paused", "no") in console.execute("SHOW STATE").fetchall()


def test_console_disable_kill_client_and_unknown_database(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"admin_users": ["postgres"]})
    with _console(proxy) as console, psycopg.connect(proxy.dsn(), autocommit=True) as victim:
        console.execute("DISABLE postgres")
        columns = [c.name for c in console.execute("SHOW DATABASES").description or ()]
        rows = {r[0]: r for r in console.execute("SHOW DATABASES").fetchall()}
        assert rows["postgres"][columns.index("disabled")] == 1
        with pytest.raises(psycopg.OperationalError, match="is disabled"):
            psycopg.connect(proxy.dsn())
        console.execute("ENABLE postgres")
        clients = console.execute("SHOW CLIENTS").fetchall()
        columns = [c.name for c in console.execute("SHOW CLIENTS").description or ()]
        ids = [
            r[columns.index("id")] for r in clients if r[columns.index("database")] == "postgres"
        ]
        assert ids == [victim.info.backend_pid]
        console.execute(f"KILL_CLIENT {ids[0]}")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        with pytest.raises(psycopg.errors.UndefinedObject, match="client not found"):
            console.execute(f"KILL_CLIENT {ids[0]}")
        with pytest.raises(psycopg.errors.InvalidCatalogName, match="no such database: nope"):
            console.execute("PAUSE nope")


def test_console_stays_open_through_a_drain(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"admin_users": ["postgres"]})
    client = psycopg.connect(proxy.dsn(), autocommit=True)
    with _console(proxy) as console, contextlib.closing(client):
        client.execute("select 1")
        console.execute("SHUTDOWN WAIT_FOR_CLIENTS")  # drains; no process to stop in a test
        with pytest.raises(psycopg.OperationalError):
            client.execute("select 1")
        assert console.execute("SHOW VERSION").fetchone() is not None
        assert proxy.call(lambda p: p.draining)
