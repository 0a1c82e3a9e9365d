"""Multi-host upstreams and failover (issue 15), against a real primary and streaming standby.

pgproxy sits in front with libpq-style two-host URLs: each ``target_session_attrs`` lands on a
server of its role, hosts that are down or unsuitable are skipped, and when the primary is
stopped and the standby promoted, pools serve again on the new primary, clients in a
transaction are told, the listener re-LISTENs there and every listener either hears what
follows or is told (``listener_loss``). Then the old primary comes back as a standby, still
listed first: neither the listener nor the pools go to it.

The pair is built once for the module (a base backup takes seconds); the failover test changes
it, so it runs last.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from pgproxy.pool.targets import query_role, role_from_params
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.standby import make_standby, promote, rejoin
from tests.conftest import MakeProxy
from tests.support.listen_fault import ListenFaultRelay
from tests.support.load import ClientLoops, hears_after_listen, told_and_closed
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, error_of

LISTENERS = 100  # per proxy: two proxies, one per listener_loss policy


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[PgCluster, PgCluster]]:
    """(primary, standby), streaming."""
    primary = PgCluster(settings={"max_connections": "100"})
    standby: PgCluster | None = None
    try:
        primary.start()
        standby = make_standby(primary)
        yield primary, standby
    finally:
        for cluster in (standby, primary):
            if cluster is not None:
                cluster.destroy()


def url(*clusters: PgCluster | int, **params: str) -> str:
    """A multi-host URL: clusters (or bare ports) in the order given."""
    ports = [c if isinstance(c, int) else c.port for c in clusters]
    query = "?" + urlencode(params) if params else ""
    return "postgresql://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/postgres" + query


def where(dsn: str) -> tuple[int, bool]:
    """(port, in recovery) of the server a fresh connection's statement ran on."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select inet_server_port(), pg_is_in_recovery()").fetchone()
    assert row is not None
    return row[0], row[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_for(make_proxy: MakeProxy, databases: dict[str, str], **proxy: Any) -> ProxyThread:
    return make_proxy(
        proxy={"default_pool_size": 4, **proxy},
        databases={name: {"url": u} for name, u in databases.items()},
    )


def test_each_target_lands_on_a_server_of_its_role(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    primary, standby = pair
    down = free_port()  # nothing listens there: skipped as libpq skips it
    expected = {
        "rw": (url(standby, primary, target_session_attrs="read-write"), primary),
        "ro": (url(primary, standby, target_session_attrs="read-only"), standby),
        "prim": (url(down, standby, primary, target_session_attrs="primary"), primary),
        "stby": (url(primary, standby, target_session_attrs="standby"), standby),
        "pref": (url(primary, standby, target_session_attrs="prefer-standby"), standby),
        "pref_none": (url(down, primary, target_session_attrs="prefer-standby"), primary),
        "any": (url(down, standby, primary), standby),
    }
    proxy = proxy_for(make_proxy, {name: u for name, (u, _) in expected.items()})
    for name, (_, cluster) in expected.items():
        assert where(proxy.dsn(dbname=name)) == (cluster.port, cluster is standby), name


def test_no_suitable_host_is_a_clear_error(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    _, standby = pair
    proxy = proxy_for(
        make_proxy, {"rw": url(free_port(), standby, target_session_attrs="read-write")}
    )
    with RawClient(proxy.port) as raw:  # libpq keeps a login error's SQLSTATE to itself
        raw.startup(database="rw")
        error = error_of(raw.read_all())
    assert error is not None and error["C"] == "08001", error
    assert "no upstream host suits target_session_attrs=read-write" in error["M"]
    assert f"127.0.0.1:{standby.port}: session is read-only" in error["M"]
    assert "could not connect" in error["M"]  # the host that is down, named too


def test_load_balance_hosts_random_spreads_servers(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    primary, standby = pair
    proxy = make_proxy(
        proxy={"default_pool_size": 16},
        databases={"lb": {"url": url(primary, standby, load_balance_hosts="random")}},
    )
    conns = [psycopg.connect(proxy.dsn(dbname="lb")) for _ in range(16)]
    try:
        # Each open transaction holds a server of its own: 16 servers, each on a random host
        # (all on one host: a chance of 2 in 65536).
        ports = {c.execute("select inet_server_port()").fetchone() for c in conns}
    finally:
        for conn in conns:
            conn.close()
    assert ports == {(primary.port,), (standby.port,)}


def test_role_query_for_servers_before_14_agrees_with_what_14_reports(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    """Before PostgreSQL 14 the role comes from a query; run it on real servers of each role
    and compare with the ParameterStatus that 14+ reports."""
    primary, standby = pair
    proxy = proxy_for(make_proxy, {"p": url(primary), "s": url(standby)})

    async def roles(p: Any) -> list[tuple[object, object]]:
        out = []
        for name in ("p", "s"):
            pool = p.pool_for(name, "postgres")
            server = await pool.acquire(5)
            try:
                out.append((await query_role(server), role_from_params(server.params)))
            finally:
                pool.release(server)
        return out

    (on_primary, reported_p), (on_standby, reported_s) = proxy.call(roles)
    assert on_primary == reported_p and not on_primary.standby and not on_primary.read_only
    assert on_standby == reported_s and on_standby.standby and on_standby.read_only


def test_listen_follows_the_primary_whatever_the_pool_serves(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    """A pool on the standby (listed first) still gets LISTEN: the listener is on the primary."""
    primary, standby = pair
    proxy = proxy_for(
        make_proxy,
        {
            "any": url(standby, primary),
            "stby": url(standby, primary, target_session_attrs="standby"),
        },
    )
    for name in ("any", "stby"):
        assert where(proxy.dsn(dbname=name))[1]  # its queries run on the standby
        hears_after_listen(proxy.dsn(dbname=name), primary.dsn(), f"follow_{name}")


def test_servers_of_a_primary_made_read_only_are_dropped_as_they_come_free(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    """default_transaction_read_only turned on by a reload: servers report it with their next
    reply, and a read-write pool closes them when they come free instead of reusing them."""
    primary, standby = pair
    proxy = proxy_for(make_proxy, {"rw": url(primary, standby, target_session_attrs="read-write")})
    dsn = proxy.dsn(dbname="rw")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select 1")
        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()")
        try:
            # The reload reaches the idle server before it is used: the query runs, the new
            # value comes with its reply, and the server goes instead of back to the pool.
            _wait(lambda: _reports_read_only(conn), "the server never reported read-only")
            with pytest.raises(psycopg.OperationalError) as caught:
                conn.execute("select 1")  # a new server: no host is read-write now
            assert caught.value.sqlstate == "08001"
            assert "session is read-only" in str(caught.value)
        finally:
            primary.psql(
                "ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf()"
            )
    # A fresh client: one that saw the reload's ParameterStatus keeps the value as its own.
    _wait(lambda: _serves(dsn), "not served again once the primary was writable")


def _reports_read_only(conn: psycopg.Connection) -> bool:
    return conn.execute("show default_transaction_read_only").fetchone() == ("on",)


def _serves(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("show default_transaction_read_only").fetchone() == ("off",)
    except psycopg.OperationalError:
        return False


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Poll until ``predicate`` (state with no event to await); returns the seconds taken."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.01)
    return time.monotonic() - start


def test_listen_is_retried_once_after_the_stale_queue_error(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    """LISTEN answered "could not access status of transaction": the listener runs
    pg_notification_queue_usage() (which advances the queue tail) and LISTENs again, and the
    client's LISTEN succeeds and hears what follows."""
    with ListenFaultRelay(pg.port) as relay:
        upstream = f"postgresql://127.0.0.1:{relay.port}/postgres?sslmode=disable"
        proxy = make_proxy(databases={"app": {"url": upstream}})
        hears_after_listen(proxy.dsn(dbname="app"), pg.dsn(), "stale_queue")
        proxy.stop()
    assert relay.faults == 0
    listener_queries = [q for q in relay.queries if q.startswith("LISTEN") or "queue_usage" in q]
    assert listener_queries == [
        'LISTEN "stale_queue"',
        "SELECT pg_catalog.pg_notification_queue_usage()",
        'LISTEN "stale_queue"',
    ]


# --- the failover (runs last: it changes the pair) -----------------------------------------------


def _listener_on(proxy: ProxyThread, port: int) -> bool:
    """The proxy's listener is connected to ``port`` with every channel LISTENed there."""

    def check(p: Any) -> bool:
        for listener in p.listeners.values():
            conn = listener.conn
            if conn is None or conn.closed or conn.address[1] != port or not listener.channels:
                return False
            if not all(
                c.ready.done() and not c.ready.exception() for c in listener.channels.values()
            ):
                return False
        return bool(p.listeners)

    return bool(proxy.call(check))


def test_failover_under_load_with_listeners(
    make_proxy: MakeProxy, pair: tuple[PgCluster, PgCluster]
) -> None:
    primary, standby = pair
    two_hosts = url(primary, standby, target_session_attrs="read-write")
    told = proxy_for(make_proxy, {"app": two_hosts}, listener_loss="disconnect")
    kept = proxy_for(make_proxy, {"app": two_hosts}, listener_loss="keep")
    listeners = {
        proxy: [psycopg.connect(proxy.dsn(dbname="app"), autocommit=True) for _ in range(LISTENERS)]
        for proxy in (told, kept)
    }
    for conns in listeners.values():
        for conn in conns:
            conn.execute("LISTEN failover")
    on_a_standby: list[str] = []

    def transaction(conn: psycopg.Connection) -> None:
        with conn.transaction():
            row = conn.execute("select pg_is_in_recovery(), inet_server_port()").fetchone()
            if row is None or row[0]:
                on_a_standby.append(repr(row))
            conn.execute("select 1")

    in_transaction = psycopg.connect(told.dsn(dbname="app"))
    in_transaction.execute("select 1")  # a transaction open on the old primary
    with (
        ClientLoops(told.dsn(dbname="app"), work=transaction) as loops_told,
        ClientLoops(kept.dsn(dbname="app"), work=transaction) as loops_kept,
    ):
        loops_told.served(20, what="before the failover")
        loops_kept.served(20, what="before the failover")
        primary.stop("fast")
        with pytest.raises(psycopg.OperationalError) as caught:
            in_transaction.execute("select 1")  # told, not left hanging
        assert caught.value.sqlstate in ("57P01", "08006"), caught.value
        in_transaction.close()
        promote(standby)
        pool_back = _wait(lambda: _served_on(told, standby.port), "no pool on the new primary")
        listener_back = _wait(lambda: _listener_on(kept, standby.port), "listener not back")
        loops_told.served(20, what="after the failover")
        loops_kept.served(20, what="after the failover")
    print(f"\nafter promotion: pool served in {pool_back:.3f}s, listener re-LISTENed in "
          f"{pool_back + listener_back:.3f}s")  # fmt: skip
    assert pool_back < 5 and pool_back + listener_back < 10  # generous: a loaded machine
    assert loops_told.unexpected == [] and loops_kept.unexpected == []
    assert on_a_standby == []
    # listener_loss = "disconnect": every listener was told; "keep": every one hears what
    # follows the re-LISTEN, all of it, in order.
    for conn in listeners[told]:
        told_and_closed(conn, "listener connection")
    _every_listener_hears(listeners[kept], standby, ["one", "two", "three"])
    hears_after_listen(told.dsn(dbname="app"), standby.dsn(), "failover_told")

    # The old primary comes back as a standby, still listed first.
    rejoin(primary, standby)
    standby.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'pgproxy-listener'"
    )
    _wait(lambda: _listener_on(kept, standby.port) and _reconnected_twice(kept), "listener")
    _every_listener_hears(listeners[kept], standby, ["four"])
    kept.call(lambda p: [pool.reconnect() for pool in p.pools.values()])
    for _ in range(5):
        assert where(kept.dsn(dbname="app")) == (standby.port, False)
    for conn in listeners[kept]:
        conn.close()


def _served_on(proxy: ProxyThread, port: int) -> bool:
    try:
        return where(proxy.dsn(dbname="app")) == (port, False)
    except psycopg.OperationalError:
        return False


def _reconnected_twice(proxy: ProxyThread) -> bool:
    return bool(proxy.call(lambda p: all(li.reconnects >= 2 for li in p.listeners.values())))


def _every_listener_hears(
    conns: list[psycopg.Connection], primary: PgCluster, payloads: list[str]
) -> None:
    with psycopg.connect(primary.dsn(), autocommit=True) as direct:
        for payload in payloads:
            direct.execute("SELECT pg_notify('failover', %s)", (payload,))
    for conn in conns:
        got = [n.payload for n in conn.notifies(timeout=10, stop_after=len(payloads))]
        assert got == payloads
