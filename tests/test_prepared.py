"""Named prepared statements in transaction mode: drivers work with their defaults."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import psycopg
import pytest

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, error_of


def test_psycopg_prepares_every_statement(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 2})
    dsn = proxy.dsn()
    with (
        psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as a,
        psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as b,
    ):
        for i in range(20):
            assert a.execute("select %s::int * 2", (i,)).fetchone() == (i * 2,)
            assert b.execute("select %s::text || 'x'", (str(i),)).fetchone() == (f"{i}x",)


def test_psycopg_default_auto_prepare_keeps_working(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(30):  # prepared from the 5th execution on
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
        with conn.transaction():
            for i in range(10):
                conn.execute("select %s::int", (i,))


async def test_asyncpg_with_its_default_statement_cache(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 2})
    conns = [await asyncpg.connect(proxy.dsn()) for _ in range(4)]
    try:
        for round_ in range(10):
            for n, conn in enumerate(conns):
                assert await conn.fetchval("select $1::int + $2::int", n, round_) == n + round_
                rows = await conn.fetch("select g from generate_series(1, $1::int) g", n + 1)
                assert [r[0] for r in rows] == list(range(1, n + 2))
        stmt = await conns[0].prepare("select $1::text || '!'")
        assert await stmt.fetchval("hi") == "hi!"
    finally:
        for conn in conns:
            await conn.close()


def test_same_names_different_texts_on_a_small_pool(make_proxy: MakeProxy, pg: PgCluster) -> None:
    """200 clients, pool of 5, every client's "s1".."s3" means something else."""
    proxy = make_proxy(proxy={"default_pool_size": 5, "max_prepared_statements": 50})

    async def client(i: int) -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            stmts = [await conn.prepare(f"select $1::int + {i * 10 + k}") for k in range(3)]
            for _ in range(5):
                k = random.randrange(3)
                assert await stmts[k].fetchval(1) == 1 + i * 10 + k
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(200)))

    asyncio.run(main())
    # Server-side statements stay bounded by the per-server cache.
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        count = conn.execute("select count(*) from pg_prepared_statements").fetchone()
        assert count is not None and count[0] <= 50


def test_bind_to_an_unknown_statement_is_26000_and_aborts_the_batch(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    pg.psql("drop table if exists t_abort; create table t_abort (v int)")
    with RawClient(proxy.port) as c:
        c.login()
        c.send(
            m.parse("", "insert into t_abort values (1)")
            + m.bind("", "")
            + m.execute()
            + m.bind("", "nope")
            + m.execute()
            + m.message(m.SYNC)
        )
        reply = c.read_until_ready()
        err = error_of(reply)
        assert err is not None and err["C"] == "26000" and '"nope"' in err["M"]
    # Exactly as directly connected: the INSERT of the failed batch was rolled back.
    assert pg.psql("select count(*) from t_abort") == "0"


def test_duplicate_parse_is_42p05_and_close_then_reparse_works(proxy: ProxyThread) -> None:
    with RawClient(proxy.port) as c:
        c.login()
        c.send(m.parse("s1", "select 1") + m.message(m.SYNC))
        assert [t for t, _ in c.read_until_ready()] == ["1", "Z"]
        c.send(m.parse("s1", "select 2") + m.message(m.SYNC))
        err = error_of(c.read_until_ready())
        assert err is not None and err["C"] == "42P05"
        c.send(m.close("S", "s1") + m.parse("s1", "select 2") + m.message(m.SYNC))
        assert [t for t, _ in c.read_until_ready()] == ["3", "1", "Z"]
        c.send(m.bind("", "s1") + m.execute() + m.message(m.SYNC))
        reply = c.read_until_ready()
        assert [t for t, _ in reply] == ["2", "D", "C", "Z"]


def test_many_distinct_statements_keep_servers_bounded(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1, "max_prepared_statements": 10})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(100):
            assert conn.execute(f"select {i} + %s::int", (1,)).fetchone() == (i + 1,)
        count = conn.execute("select count(*) from pg_prepared_statements").fetchone()
        assert count is not None and count[0] <= 10
        # Evicted statements come back transparently.
        assert conn.execute("select 0 + %s::int", (5,)).fetchone() == (5,)


def test_deallocate_all_and_discard_all_forget_statements(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        conn.execute("select %s::int", (1,))
        conn.execute("DEALLOCATE ALL")
        assert conn.execute("select %s::int", (2,)).fetchone() == (2,)
        conn.execute("DISCARD ALL")
        assert conn.execute("select %s::int", (3,)).fetchone() == (3,)


@pytest.mark.parametrize("mode", ["-M prepared", "-M extended"])
def test_pgbench_modes(make_proxy: MakeProxy, pg: PgCluster, mode: str) -> None:
    import subprocess

    from pgproxy.testing.cluster import find_bindir

    proxy = make_proxy(proxy={"default_pool_size": 3})
    pgbench = str(find_bindir() / "pgbench")
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(proxy.port), "PGUSER": "postgres"}
    subprocess.run([pgbench, "-i", "-s", "1", "-q", "postgres"], env=env, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    out = subprocess.run(
        [pgbench, *mode.split(), "-c", "8", "-j", "2", "-t", "50", "-S", "postgres"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "number of failed transactions: 0" in out.stdout


def test_statement_bookkeeping_stays_bounded(proxy: ProxyThread) -> None:
    """Statements whose text merely mentions savepoint words are not tracked for LISTEN."""
    with RawClient(proxy.port) as c:
        c.login()
        for i in range(50):
            c.send(
                m.parse(f"s{i}", "select 'release rollback savepoint'")
                + m.bind(f"p{i}", f"s{i}")
                + m.execute(f"p{i}")
                + m.message(m.SYNC)
            )
            assert error_of(c.read_until_ready()) is None
        # Not even created: no statement had LISTEN/SET effects.
        assert proxy.call(lambda p: [s.pending for s in p._sessions]) == [None]
