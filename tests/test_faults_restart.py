"""Postgres restarted (fast and immediate) under load and with listeners (issue 16): clients
get at most an error for the statement that was running, are served again within seconds,
listeners are told and hear notifications again once they LISTEN again."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy

LISTENERS = 50


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restart_under_load_with_listeners(
    make_proxy: MakeProxy, pg: PgCluster, mode: str
) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 4})
    listeners = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(LISTENERS)]
    for conn in listeners:
        conn.execute("LISTEN restart_ch")
    stop, done, unexpected = threading.Event(), [0], []

    def worker() -> None:
        conn: psycopg.Connection | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
                assert conn.execute("select 1").fetchone() == (1,)
                done[0] += 1
            except psycopg.OperationalError:
                conn = None  # the server died under the statement, or Postgres was down
            except psycopg.Error as exc:
                unexpected.append(repr(exc))
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while done[0] < 50:
            assert time.monotonic() < deadline, "no traffic"
            time.sleep(0.02)
        pg.restart(mode)
        back = time.monotonic()
        before = done[0]
        while done[0] < before + 50:  # served again
            assert time.monotonic() - back < 15, "not served again after the restart"
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert unexpected == []
    # Every listener was told (listener_loss = "disconnect"), none left waiting in silence.
    for conn in listeners:
        try:
            conn.execute("select 1")
            raise AssertionError("a listener was not told of the restart")
        except psycopg.OperationalError as exc:
            assert "listener connection" in str(exc) or "terminat" in str(exc)
        finally:
            conn.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as again:
        again.execute("LISTEN restart_ch")
        with psycopg.connect(pg.dsn(), autocommit=True) as direct:
            direct.execute("NOTIFY restart_ch, 'after'")
        assert [n.payload for n in again.notifies(timeout=10, stop_after=1)] == ["after"]
