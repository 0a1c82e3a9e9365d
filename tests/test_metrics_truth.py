"""/metrics tells the truth: a scripted workload on one process, and what Prometheus is told.

Transactions on a pool of one, a client holding the server and another waiting for it,
listeners on channels, notifications held during a transaction and dropped when the client
leaves inside it; every figure checked against what the test did (and against SHOW, which
/metrics reads through the console's own tables). The text is parsed with prometheus_client's
parser, as a scraper would.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.test_admin_truth import one, show, wait_for
from tests.test_ops_http import _families, metrics_port


@pytest.fixture
def proxy(make_proxy: MakeProxy, pg: PgCluster) -> ProxyThread:
    return make_proxy(
        proxy={
            "admin_users": ["postgres"],
            "metrics_listen": "127.0.0.1:0",
            "metrics_channel_labels": True,
        },
        databases={"one": {"url": f"postgresql://{pg.host}:{pg.port}/postgres", "pool_size": 1}},
    )


def sample(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    """The one sample of ``family`` with exactly these labels."""
    found = [
        s.value
        for s in families[family].samples
        if s.name == family + suffix and s.labels == labels
    ]
    assert len(found) == 1, (family, labels, families[family].samples)
    return float(found[0])


def test_transactions_and_a_waiting_client(proxy: ProxyThread) -> None:
    port = metrics_port(proxy)
    with psycopg.connect(proxy.dsn(dbname="one"), autocommit=True) as worker:
        for _ in range(5):
            worker.execute("select 1")
    holder = psycopg.connect(proxy.dsn(dbname="one", application_name="holder"))
    waiter = psycopg.connect(proxy.dsn(dbname="one", application_name="waiter"), autocommit=True)
    try:
        holder.execute("select 1")  # BEGIN, select: holds the only server
        thread = threading.Thread(target=lambda: waiter.execute("select 1"))
        thread.start()
        time.sleep(0.3)
        wait_for(lambda: sample(_families(port), "pgbouncer_pools_client_waiting_connections",
                                database="one", user="postgres") == 1)  # fmt: skip

        families = _families(port)
        pool = {"database": "one", "user": "postgres"}
        assert sample(families, "pgbouncer_pools_client_active_connections", **pool) == 1
        assert sample(families, "pgbouncer_pools_server_active_connections", **pool) == 1
        assert sample(families, "pgbouncer_pools_server_idle_connections", **pool) == 0
        assert sample(families, "pgbouncer_pools_client_maxwait_seconds", **pool) >= 0.3
        clients = {"database": "one", "user": "postgres"}
        assert sample(families, "pgbouncer_client_connections", application_name="holder",
                      state="active", **clients) == 1  # fmt: skip
        assert sample(families, "pgbouncer_client_connections", application_name="waiter",
                      state="waiting", **clients) == 1  # fmt: skip
        database = {"name": "one", "host": proxy.config.databases["one"].host,
                    "port": str(proxy.config.databases["one"].port), "database": "postgres",
                    "force_user": "", "pool_mode": ""}  # fmt: skip
        assert sample(families, "pgbouncer_databases_pool_size", **database) == 1
        assert sample(families, "pgbouncer_databases_current_connections", **database) == 1
        assert sample(families, "pgbouncer_databases_current_client_connections", **database) == 2
        assert sample(families, "pgbouncer_databases_paused", **database) == 0

        holder.commit()
        thread.join(10)
        assert not thread.is_alive()
        families = _families(port)
        totals = families["pgbouncer_stats_totals_sql_transactions_pooled"]
        assert totals.type == "counter"
        stats = "pgbouncer_stats_totals_"

        def total(name: str) -> float:
            return sample(families, stats + name, "_total", database="one")

        assert total("sql_transactions_pooled") == 5 + 1 + 1  # the selects, held, waiter's
        assert total("queries_pooled") == 5 + 3 + 1  # BEGIN, select, COMMIT
        assert total("server_assignments") == 7
        assert total("client_wait_seconds") >= 0.3
        assert total("server_in_transaction_seconds") >= total("queries_duration_seconds") > 0
        with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
            shown = one(show(console, "STATS_TOTALS"), database="one")
        assert total("received_bytes") == shown["bytes_received"] > 0
        assert total("sent_bytes") == shown["bytes_sent"] > 0
        assert total("client_wait_seconds") == int(shown["wait_time"]) / 1e6
        assert sample(families, "pgbouncer_used_clients") == 2
        assert sample(families, "pgproxy_workers") == sample(families, "pgproxy_workers_answering")
        assert sample(families, "pgproxy_workers") == 1
    finally:
        holder.close()
        waiter.close()


def test_listeners_notifications_and_what_was_dropped(proxy: ProxyThread, pg: PgCluster) -> None:
    port = metrics_port(proxy)
    a = psycopg.connect(proxy.dsn(), autocommit=True)
    b = psycopg.connect(proxy.dsn(), autocommit=True)
    inside = psycopg.connect(proxy.dsn())  # leaves inside a transaction
    try:
        a.execute("LISTEN alpha")
        b.execute("LISTEN alpha")
        b.execute("LISTEN beta")
        inside.execute("LISTEN gamma")
        inside.commit()
        inside.execute("select 1")  # a transaction: its notifications are held meanwhile
        with psycopg.connect(pg.dsn(), autocommit=True) as sender:
            sender.execute("select pg_notify('alpha', '1'), pg_notify('beta', '2')")
            sender.execute("select pg_notify('alpha', '3')")
            sender.execute("select pg_notify('gamma', '4'), pg_notify('gamma', '5')")
        assert len(list(a.notifies(timeout=5, stop_after=2))) == 2
        assert len(list(b.notifies(timeout=5, stop_after=3))) == 3
        db = {"database": "postgres"}
        wait_for(lambda: sample(_families(port), "pgproxy_notifications_delivered",
                                "_total", **db) == 2 + 2 + 1 + 2)  # fmt: skip

        families = _families(port)
        assert sample(families, "pgproxy_listener_up", **db) == 1
        assert sample(families, "pgproxy_listener_channels", **db) == 3
        assert sample(families, "pgproxy_listener_subscribers", **db) == 3
        assert sample(families, "pgproxy_notifications_received", "_total", **db) == 5
        assert sample(families, "pgproxy_notifications_dropped", "_total", **db) == 0
        assert sample(families, "pgproxy_listener_reconnects", "_total", **db) == 0
        alpha = {"database": "postgres", "channel": "alpha"}
        assert sample(families, "pgproxy_channel_subscribers", **alpha) == 2
        assert sample(families, "pgproxy_channel_notifications_received", "_total", **alpha) == 2
        assert sample(families, "pgproxy_channel_notifications_delivered", "_total", **alpha) == 4

        inside.close()  # the two gamma notifications it held never reach it
        wait_for(lambda: sample(_families(port), "pgproxy_notifications_dropped",
                                "_total", **db) == 2)  # fmt: skip
        families = _families(port)
        assert sample(families, "pgproxy_listener_subscribers", **db) == 2
        assert sample(families, "pgproxy_slow_consumer_disconnects", "_total", **db) == 0
    finally:
        a.close()
        b.close()
        inside.close()


def test_no_channel_label_unless_asked(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"metrics_listen": "127.0.0.1:0"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("LISTEN alpha")
        families = _families(metrics_port(proxy))
    assert sample(families, "pgproxy_listener_channels", database="postgres") == 1
    assert not [name for name in families if name.startswith("pgproxy_channel_")]
