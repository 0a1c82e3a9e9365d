"""The console tells the truth: a scripted workload, and what SHOW says about it.

Transaction clients on a pool of one (one holds the server in a transaction, another waits
for it), listeners on channels, a slow consumer, and steady traffic for the averages; every
figure checked against what the test did or what Postgres itself reports.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient

Rows = list[dict[str, Any]]


def show(console: psycopg.Connection, what: str) -> Rows:
    cur = console.execute(f"SHOW {what}")
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def one(rows: Rows, **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def value(rows: Rows, column: str, **match: Any) -> Any:
    """``column`` of the row matching, or None if there is none (yet)."""
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return found[0][column] if found else None


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def proxy(make_proxy: MakeProxy, pg: PgCluster) -> ProxyThread:
    return make_proxy(
        proxy={"admin_users": ["postgres"], "stats_period": 1, "notify_buffer_size": 65536},
        databases={"one": {"url": f"postgresql://{pg.host}:{pg.port}/postgres", "pool_size": 1}},
    )


@pytest.fixture
def console(proxy: ProxyThread) -> psycopg.Connection:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as con:
        yield con


def test_a_transaction_holding_the_only_server_and_a_client_waiting_for_it(
    proxy: ProxyThread, console: psycopg.Connection
) -> None:
    holder = psycopg.connect(proxy.dsn(dbname="one"))
    waiter = psycopg.connect(proxy.dsn(dbname="one"), autocommit=True)
    try:
        backend_pid = holder.execute("select pg_backend_pid()").fetchone()[0]  # BEGIN, held
        thread = threading.Thread(target=lambda: waiter.execute("select 1"))
        thread.start()
        wait_for(lambda: one(show(console, "POOLS"), database="one")["cl_waiting"] == 1)
        time.sleep(0.3)

        pool = one(show(console, "POOLS"), database="one")
        assert (pool["cl_active"], pool["cl_waiting"]) == (1, 1)
        assert (pool["sv_active"], pool["sv_idle"], pool["sv_login"]) == (1, 0, 0)
        assert pool["maxwait"] * 1_000_000 + pool["maxwait_us"] >= 300_000
        assert pool["pool_mode"] == "transaction" and pool["user"] == "postgres"

        clients = show(console, "CLIENTS")
        [server] = show(console, "SERVERS")
        held = one(clients, id=holder.info.backend_pid)
        waiting = one(clients, id=waiter.info.backend_pid)
        assert (held["state"], held["link"], held["database"]) == ("active", server["ptr"], "one")
        assert (waiting["state"], waiting["link"]) == ("waiting", "")
        assert waiting["wait"] * 1_000_000 + waiting["wait_us"] >= 300_000
        assert (server["state"], server["remote_pid"]) == ("active", backend_pid)
        assert (server["link"], server["database"], server["port"]) == (
            held["ptr"],
            "one",
            proxy.config.databases["one"].port,
        )
        assert one(clients, database="pgbouncer")["state"] == "idle"  # this console

        holder.commit()
        thread.join(10)
        assert not thread.is_alive()
        wait_for(lambda: one(show(console, "POOLS"), database="one")["sv_idle"] == 1)
        pool = one(show(console, "POOLS"), database="one")
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"]) == (2, 0, 0)

        stats = one(show(console, "STATS"), database="one")
        assert stats["total_xact_count"] == 2  # the held transaction, the waiter's select
        assert stats["total_query_count"] == 4  # BEGIN, select, COMMIT; select
        assert stats["total_server_assignment_count"] == 2
        assert stats["total_wait_time"] >= 300_000
        assert stats["total_client_login_count"] == 2
        assert stats["total_received"] > 0 and stats["total_sent"] > 0
        assert stats["total_xact_time"] >= stats["total_query_time"] > 0
        totals = show(console, "STATS_TOTALS")
        assert one(totals, database="one")["xact_count"] == 2

        database = one(show(console, "DATABASES"), name="one")
        assert (database["pool_size"], database["current_connections"]) == (1, 1)
        assert database["current_client_connections"] == 2
        assert one(show(console, "USERS"), name="postgres")["current_client_connections"] == 2
        lists = {r["list"]: r["items"] for r in show(console, "LISTS")}
        assert (lists["used_clients"], lists["login_clients"], lists["used_servers"]) == (3, 0, 1)
    finally:
        holder.close()
        waiter.close()


# 50 notifications of 7 kB (distinct: Postgres folds identical ones within a transaction).
FLOOD = "select pg_notify('flood', repeat('x', 7000) || g) from generate_series(1, 50) g"


def _listener_backend(pg: PgCluster) -> int:
    return int(
        pg.psql("select pid from pg_stat_activity where application_name = 'pgproxy-listener'")
    )


def test_listeners_channels_and_a_slow_consumer(
    proxy: ProxyThread, console: psycopg.Connection, pg: PgCluster
) -> None:
    a = psycopg.connect(proxy.dsn(), autocommit=True)
    b = psycopg.connect(proxy.dsn(), autocommit=True)
    stuck = RawClient(proxy.port)
    try:
        a.execute("LISTEN alpha")
        a.execute("LISTEN beta")
        b.execute("LISTEN alpha")
        with psycopg.connect(pg.dsn(), autocommit=True) as sender:
            for payload in ("1", "2", "3"):
                sender.execute("select pg_notify('alpha', %s)", (payload,))
            sender.execute("NOTIFY beta")
        assert len(list(a.notifies(timeout=5, stop_after=4))) == 4
        assert len(list(b.notifies(timeout=5, stop_after=3))) == 3

        [listener] = show(console, "LISTENERS")
        assert listener["database"] == "postgres" and listener["state"] == "listening"
        assert listener["backend_pid"] == _listener_backend(pg)
        assert (listener["channels"], listener["subscribers"]) == (2, 2)
        assert listener["notifications_received"] == 4
        assert listener["notifications_delivered"] == 7
        assert (listener["slow_consumer_disconnects"], listener["reconnects"]) == (0, 0)
        assert listener["last_error"] is None
        channels = show(console, "CHANNELS")
        assert one(channels, channel="alpha") == {
            "database": "postgres",
            "channel": "alpha",
            "subscribers": 2,
            "notifications_received": 3,
            "notifications_delivered": 6,
        }
        assert one(channels, channel="beta")["notifications_delivered"] == 1

        # A client that stops reading is cut off once its backlog passes notify_buffer_size.
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.login()
        stuck.query("LISTEN flood")
        with psycopg.connect(pg.dsn(), autocommit=True) as sender:
            for _ in range(40):
                sender.execute(FLOOD)
                if show(console, "LISTENERS")[0]["slow_consumer_disconnects"]:
                    break
        wait_for(lambda: show(console, "LISTENERS")[0]["slow_consumer_disconnects"] > 0)
        [listener] = show(console, "LISTENERS")
        assert listener["slow_consumer_disconnects"] == 1
        assert listener["subscribers"] == 2  # the stuck client is gone
        assert {r["channel"] for r in show(console, "CHANNELS")} == {"alpha", "beta"}
    finally:
        stuck.close()
        a.close()
        b.close()


def test_averages_are_per_second_over_the_last_stats_period(
    proxy: ProxyThread, console: psycopg.Connection
) -> None:
    stop = threading.Event()

    def traffic() -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True) as con:
            while not stop.is_set():
                con.execute("select 1")
                time.sleep(0.005)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_for(
            lambda: (
                (value(show(console, "STATS_AVERAGES"), "xact_count", database="postgres") or 0) > 0
            )
        )
        averages = one(show(console, "STATS_AVERAGES"), database="postgres")
        # Between 1 and 200 transactions a second (a 5 ms pause between them), each taking
        # a positive time, no wait for a server.
        assert 1 <= averages["xact_count"] <= 200
        assert averages["query_count"] == averages["xact_count"]
        assert averages["xact_time"] >= averages["query_time"] > 0
        assert averages["bytes_received"] > 0 and averages["bytes_sent"] > 0
        stats = one(show(console, "STATS"), database="postgres")
        assert stats["avg_xact_count"] > 0 and stats["avg_recv"] > 0
        totals = {r["name"]: r["value"] for r in show(console, "TOTALS")}
        assert (
            totals["avg_xact_count"] > 0 and totals["total_xact_count"] >= totals["avg_xact_count"]
        )
    finally:
        stop.set()
        thread.join(10)
