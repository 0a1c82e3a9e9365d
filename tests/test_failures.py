"""Failures around the proxy: dying servers, restarts, a full pool, clients that vanish."""

from __future__ import annotations

import socket
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import (
    MD5_PASSWORD,
    MD5_USER,
    PW_PASSWORD,
    PW_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    PgCluster,
)
from tests.conftest import MakeProxy, pg_server_url
from tests.support.proxy_runner import ProxyThread


def _wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll an external condition (Postgres state) that offers no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _backend_pids(pg: PgCluster, query_like: str = "%") -> list[int]:
    out = pg.psql(
        "select pid from pg_stat_activity where backend_type = 'client backend'"
        f" and pid <> pg_backend_pid() and query like '{query_like}'"
    )
    return [int(x) for x in out.split()]


def test_server_killed_while_idle_in_pool_is_replaced(proxy: ProxyThread, pg: PgCluster) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert pid is not None
        pg.psql(f"select pg_terminate_backend({pid[0]})")
        _wait_until(lambda: pid[0] not in _backend_pids(pg))
        # The dead server was dropped from the pool: the next query just works.
        assert conn.execute("select 42").fetchone() == (42,)


def test_server_killed_mid_query_gives_an_error_and_the_client_goes_on(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:

        def kill() -> None:
            _wait_until(lambda: bool(_backend_pids(pg, "select pg_sleep(30)%")))
            for pid in _backend_pids(pg, "select pg_sleep(30)%"):
                pg.psql(f"select pg_terminate_backend({pid})")

        killer = threading.Thread(target=kill)
        killer.start()
        with pytest.raises(pgerrors.AdminShutdown):
            conn.execute("select pg_sleep(30)")
        killer.join()
        assert conn.execute("select 'still here'").fetchone() == ("still here",)


def test_server_killed_inside_a_transaction_closes_the_client(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    conn = psycopg.connect(proxy.dsn())
    try:
        conn.execute("select 1")  # opens a transaction (psycopg's default)
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert pid is not None
        pg.psql(f"select pg_terminate_backend({pid[0]})")
        # Carrying on in autocommit would silently break atomicity: the session must end.
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 2")
            conn.commit()
    finally:
        conn.close()
    with psycopg.connect(proxy.dsn()) as fresh:
        assert fresh.execute("select 3").fetchone() == (3,)


def test_client_vanishing_mid_transaction_rolls_back(proxy: ProxyThread, pg: PgCluster) -> None:
    pg.psql("drop table if exists t_vanish; create table t_vanish (v int primary key)")
    conn = psycopg.connect(proxy.dsn())
    conn.execute("insert into t_vanish values (1)")
    # Kill the client's socket without a Terminate message.
    conn.pgconn.socket and socket.socket(fileno=conn.pgconn.socket).close()
    # The row lock is released and the row never committed: another client can insert it.
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        other.execute("set lock_timeout = '5s'")
        other.execute("insert into t_vanish values (1)")
        assert other.execute("select count(*) from t_vanish").fetchone() == (1,)
        other.execute("reset lock_timeout")


def test_postgres_restart_under_the_proxy(proxy: ProxyThread, pg: PgCluster) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        pg.restart()
        # The first query may meet the dead server (it learns of the restart then) ...
        try:
            conn.execute("select 1")
        except psycopg.OperationalError:
            pass
        # ... and every later one gets a fresh server.
        assert conn.execute("select 2").fetchone() == (2,)
    with psycopg.connect(proxy.dsn()) as conn2:
        assert conn2.execute("select 3").fetchone() == (3,)


def test_upstream_down_gives_a_clear_error_and_recovers(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    proxy = make_proxy(proxy={"server_connect_timeout": 2})
    pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="could not connect to upstream"):
            psycopg.connect(proxy.dsn(), connect_timeout=10)
        assert time.monotonic() - started < 5
    finally:
        pg.start()
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_query_wait_timeout_fails_only_the_waiting_query(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 0.5})
    holder = psycopg.connect(proxy.dsn())
    try:
        holder.execute("select 1")  # holds the only server inside a transaction
        with psycopg.connect(proxy.dsn(), autocommit=True) as waiter:
            with pytest.raises(pgerrors.QueryCanceled, match="query_wait_timeout"):
                waiter.execute("select 2")
            holder.commit()
            assert waiter.execute("select 3").fetchone() == (3,)
    finally:
        holder.close()


def test_cancel_of_a_query_waiting_for_a_server(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 30})
    holder = psycopg.connect(proxy.dsn())
    try:
        holder.execute("select 1")
        with psycopg.connect(proxy.dsn(), autocommit=True) as waiter:
            timer = threading.Timer(0.3, waiter.cancel_safe)
            timer.start()
            started = time.monotonic()
            with pytest.raises(pgerrors.QueryCanceled):
                waiter.execute("select 2")
            assert time.monotonic() - started < 10
            holder.commit()
            assert waiter.execute("select 3").fetchone() == (3,)
    finally:
        holder.close()


def test_idle_in_transaction_timeout_ends_the_session(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"idle_transaction_timeout": 0.3, "default_pool_size": 1})
    conn = psycopg.connect(proxy.dsn())
    try:
        conn.execute("select 1")
        _wait_until(lambda: conn.closed or _socket_closed(conn), timeout=5)
        with pytest.raises(pgerrors.IdleInTransactionSessionTimeout):
            conn.execute("select 2")
    finally:
        conn.close()
    # The only server was freed: a new client gets it.
    with psycopg.connect(proxy.dsn()) as fresh:
        assert fresh.execute("select 4").fetchone() == (4,)


def _socket_closed(conn: psycopg.Connection) -> bool:
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        sock.setblocking(False)
        try:
            return sock.recv(1, socket.MSG_PEEK) != b""  # FATAL pending: the proxy spoke
        except BlockingIOError:
            return False
    finally:
        sock.detach()


@pytest.mark.parametrize(
    ("user", "password"),
    [(MD5_USER, MD5_PASSWORD), (SCRAM_USER, SCRAM_PASSWORD), (PW_USER, PW_PASSWORD)],
)
def test_upstream_password_authentication(
    make_proxy: MakeProxy, pg: PgCluster, user: str, password: str
) -> None:
    url = pg_server_url(pg).replace("://", f"://{user}:{password}@")
    proxy = make_proxy(databases={"*": {"url": url}})
    with psycopg.connect(proxy.dsn(user=user)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


async def test_wrong_upstream_password_reaches_the_client_as_28p01(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    url = pg_server_url(pg).replace("://", f"://{SCRAM_USER}:wrong@")
    proxy = make_proxy(databases={"*": {"url": url}})
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.dsn(user=SCRAM_USER))


async def test_client_scram_and_md5_auth_through_asyncpg(make_proxy: MakeProxy) -> None:
    for method in ("md5", "scram-sha-256"):
        proxy = make_proxy(proxy={"auth_type": method}, users={"postgres": {"password": "s3cret"}})
        conn = await asyncpg.connect(proxy.dsn(password="s3cret"))
        assert await conn.fetchval("select 1") == 1
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(proxy.dsn(password="nope"))


def test_wait_timeout_during_a_large_simple_query_does_not_hang(make_proxy: MakeProxy) -> None:
    """The Query is still arriving when its wait times out: it gets its error and
    ReadyForQuery, the rest of it is dropped, and the next Query works."""
    from pgproxy.protocol import messages as m
    from tests.support.raw import RawClient, error_of, rows_of

    proxy = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 0.5})
    holder = psycopg.connect(proxy.dsn())
    try:
        holder.execute("select 1")  # the only server, held
        with RawClient(proxy.port) as c:
            c.login()
            query = m.query("select '" + "x" * 2_000_000 + "'")
            c.send(query[:300_000])
            reply = c.read_until_ready()
            err = error_of(reply)
            assert err is not None and err["C"] == "57014"
            c.send(query[300_000:])  # dropped, as the unit already ended
            holder.commit()
            assert rows_of(c.query("select 'next'")) == [["next"]]
    finally:
        holder.close()


def test_waiting_clients_are_served_in_arrival_order_and_expire_together(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    """A full pool hands each freed server to the oldest waiter, from inside the release; one
    pool timer fails every waiter whose query_wait_timeout passed, and no one else."""
    from tests.support.raw import RawClient, error_of, rows_of

    pg.psql("drop sequence if exists wait_order; create sequence wait_order")
    proxy = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 30})

    def queued() -> int:
        return proxy.call(lambda p: sum(len(pool.waiters) for pool in p.pools.values()))

    holder = psycopg.connect(proxy.dsn())
    waiters = [RawClient(proxy.port) for _ in range(3)]
    try:
        holder.execute("select 1")  # holds the only server inside a transaction
        for n, c in enumerate(waiters, 1):
            c.login()
            c.send(m.query("select nextval('wait_order')"))
            _wait_until(lambda n=n: queued() == n)
        holder.commit()
        got = [rows_of(c.read_until_ready()) for c in waiters]
        assert got == [[["1"]], [["2"]], [["3"]]]
        # Expiry: two waiters time out together; the pool serves the next query at once.
        holder.execute("select 1")
        proxy.call(
            lambda p: [setattr(pool, "_expiry_at", float("inf")) for pool in p.pools.values()]
        )
        for c in waiters[:2]:
            c.send(m.query("select 'late'"))
        _wait_until(lambda: queued() == 2)
        proxy.call(lambda p: [pool._expire_waiters() for pool in p.pools.values()])
        assert queued() == 2  # deadlines (30 s) not reached: nobody failed early
        proxy.call(
            lambda p: [
                setattr(w, "deadline", 0.0) for pool in p.pools.values() for w in pool.waiters
            ]
        )
        proxy.call(lambda p: [pool._expire_waiters() for pool in p.pools.values()])
        for c in waiters[:2]:
            err = error_of(c.read_until_ready())
            assert err is not None and err["C"] == "57014" and "query_wait_timeout" in err["M"]
        holder.commit()
        assert rows_of(waiters[2].query("select 'next'")) == [["next"]]
    finally:
        holder.close()
        for c in waiters:
            c.close()
