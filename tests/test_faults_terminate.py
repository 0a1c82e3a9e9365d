"""Pooled servers and the listener killed again and again under load (issue 16): clients see
at most an error for the statement that was running, never a hang; listeners are told and
hear notifications again once they LISTEN again; nothing stays stuck afterwards."""

from __future__ import annotations

import psycopg

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.load import (
    ClientLoops,
    hears_after_listen,
    no_server_stays_taken,
    told_and_closed,
)

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
    early = psycopg.connect(proxy.dsn(), autocommit=True)  # a listener from the start
    early.execute("LISTEN during_kills")
    with ClientLoops(proxy.dsn()) as loops:
        loops.served(50, what="before the kills")
        for round_ in range(15):
            pg.psql(KILL_LISTENER if round_ % 5 == 4 else KILL_SERVER)
            loops.served(10, what=f"after kill {round_}")  # serving again, no hang
    assert loops.unexpected == []
    # The early listener was told its listener connection died (listener_loss = "disconnect"),
    # not left waiting for notifications that would never come.
    told_and_closed(early, "lost its listener connection")
    hears_after_listen(proxy.dsn(), pg.dsn(), "after_kills")
    # Nothing stays taken once the clients are gone.
    no_server_stays_taken(proxy)
