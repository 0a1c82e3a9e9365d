"""Postgres restarted (fast and immediate) under load and with listeners (issue 16): clients
get at most an error for the statement that was running, are served again within seconds,
listeners are told and hear notifications again once they LISTEN again."""

from __future__ import annotations

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.load import ClientLoops, hears_after_listen, told_and_closed

LISTENERS = 50


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restart_under_load_with_listeners(
    make_proxy: MakeProxy, pg: PgCluster, mode: str
) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 4})
    listeners = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(LISTENERS)]
    for conn in listeners:
        conn.execute("LISTEN restart_ch")
    with ClientLoops(proxy.dsn()) as loops:
        loops.served(50, what="before the restart")
        pg.restart(mode)
        loops.served(50, timeout=15, what="after the restart")
    assert loops.unexpected == []
    # Every listener was told (listener_loss = "disconnect"), none left waiting in silence.
    for conn in listeners:
        told_and_closed(conn, "listener connection")
    hears_after_listen(proxy.dsn(), pg.dsn(), "restart_ch")
