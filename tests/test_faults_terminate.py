"""Pooled servers and the listener killed again and again under load (issue 16): clients see
at most an error for the statement that was running, never a hang; listeners are told and
hear notifications again once they LISTEN again; nothing stays stuck afterwards."""

from __future__ import annotations

import threading
import time

import psycopg
from psycopg import errors as pg_errors

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy

KILL_SERVER = (
    "select pg_terminate_backend(pid) from pg_stat_activity where backend_type = 'client backend'"
    " and pid <> pg_backend_pid() and application_name not in ('pgproxy-listener', 'psql')"
    " order by random() limit 1"
)
KILL_LISTENER = (
    "select pg_terminate_backend(pid) from pg_stat_activity"
    " where application_name = 'pgproxy-listener'"
)


def test_terminated_servers_and_listener_under_load(make_proxy: MakeProxy, pg: PgCluster) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 4})
    stop = threading.Event()
    done = [0]
    unexpected: list[str] = []

    def worker() -> None:
        conn: psycopg.Connection | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
                assert conn.execute("select 1").fetchone() == (1,)
                done[0] += 1
            except (pg_errors.AdminShutdown, psycopg.OperationalError) as exc:
                # The statement's server was killed: an error for it, or a closed connection.
                if "terminat" not in str(exc) and "closed" not in str(exc) and conn is not None:
                    unexpected.append(repr(exc))
                conn = None
            except psycopg.Error as exc:
                unexpected.append(repr(exc))
                conn = None
        if conn is not None:
            conn.close()

    early = psycopg.connect(proxy.dsn(), autocommit=True)  # a listener from the start
    early.execute("LISTEN during_kills")
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while done[0] < 50:
            assert time.monotonic() < deadline, "no traffic"
            time.sleep(0.02)
        for round_ in range(15):
            pg.psql(KILL_LISTENER if round_ % 5 == 4 else KILL_SERVER)
            before = done[0]
            deadline = time.monotonic() + 20
            while done[0] < before + 10:  # serving again after each kill, no hang
                assert time.monotonic() < deadline, f"stuck after kill {round_}"
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert unexpected == []
    # The early listener was told its listener connection died (listener_loss = "disconnect"),
    # not left waiting for notifications that would never come.
    try:
        early.execute("select 1")
        raise AssertionError("the listener was not told its notifications may be lost")
    except psycopg.OperationalError as exc:
        assert "lost its listener connection" in str(exc)
    finally:
        early.close()
    # A listener (re)subscribing now hears notifications: the listener connection is back.
    with psycopg.connect(proxy.dsn(), autocommit=True) as listener:
        listener.execute("LISTEN after_kills")
        with psycopg.connect(pg.dsn(), autocommit=True) as direct:
            direct.execute("NOTIFY after_kills, 'heard'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.payload for n in got] == ["heard"]
    # Nothing stays taken once the clients are gone.
    deadline = time.monotonic() + 10
    while proxy.call(lambda p: sum(len(pool.active) for pool in p.pools.values())):
        assert time.monotonic() < deadline, "a pooled server stayed in use"
        time.sleep(0.05)
