"""The proxy core through real drivers: what an application sees after changing DATABASE_URL."""

from __future__ import annotations

import asyncio
import subprocess
import threading

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster, find_bindir
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, rows_of


def test_parameterized_queries_return_right_types(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        row = conn.execute(
            "select %s::int + 1, %s::text, %s::numeric", (41, "héllo", "1.5")
        ).fetchone()
        assert row is not None
        assert row[0] == 42
        assert row[1] == "héllo"
        assert str(row[2]) == "1.5"


def test_commit_and_rollback_are_honoured(proxy: ProxyThread, pg: PgCluster) -> None:
    pg.psql("drop table if exists t_commit; create table t_commit (v int)")
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.transaction():
            conn.execute("insert into t_commit values (1)")
        try:
            with conn.transaction():
                conn.execute("insert into t_commit values (2)")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
    assert pg.psql("select array_agg(v) from t_commit") == "{1}"


def test_error_inside_transaction_aborts_it_and_the_session_recovers(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("begin")
        with pytest.raises(pgerrors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.execute("rollback")
        assert conn.execute("select 2").fetchone() == (2,)


def test_copy_in_and_out(proxy: ProxyThread, pg: PgCluster) -> None:
    pg.psql("drop table if exists t_copy; create table t_copy (a int, b text)")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("copy t_copy from stdin") as copy:
            for i in range(5000):
                copy.write_row((i, f"row {i}"))
        assert conn.execute("select count(*), sum(a) from t_copy").fetchone() == (5000, 12497500)
        out = b""
        with cur.copy("copy (select a from t_copy order by a limit 3) to stdout") as copy:
            for chunk in copy:
                out += bytes(chunk)
        assert out == b"0\n1\n2\n"
        # The server is still usable afterwards.
        assert conn.execute("select 1").fetchone() == (1,)


def test_failing_copy_in_leaves_everything_usable(proxy: ProxyThread, pg: PgCluster) -> None:
    pg.psql("drop table if exists t_copy_fail; create table t_copy_fail (a int)")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(pgerrors.InvalidTextRepresentation):  # noqa: SIM117
            with cur.copy("copy t_copy_fail from stdin") as copy:
                copy.write(b"1\n2\nnot-a-number\n")
                for i in range(2000):
                    copy.write(f"{i}\n".encode())
        assert conn.execute("select count(*) from t_copy_fail").fetchone() == (0,)


def test_copy_data_pipelined_ahead_of_copy_in_response(proxy: ProxyThread, pg: PgCluster) -> None:
    """COPY, its data and CopyDone in one write, before the server has asked for data: the
    server is released at the end as usual and the next query on the link works."""
    pg.psql("drop table if exists t_copy_ahead; create table t_copy_ahead (a int)")
    with RawClient(proxy.port) as c:
        c.login()
        c.send(
            m.query("copy t_copy_ahead from stdin")
            + m.message(m.COPY_DATA, b"1\n2\n")
            + m.message(m.COPY_DONE)
        )
        reply = c.read_until_ready()
        assert [t for t, _ in reply] == ["G", "C", "Z"]
        assert reply[1][1] == b"COPY 2\0"
        assert rows_of(c.query("select sum(a) from t_copy_ahead")) == [["3"]]
        # The same through the extended protocol, with the Syncs libpq would send around it.
        c.send(
            m.parse("", "copy t_copy_ahead from stdin", [])
            + m.bind("", "", [])
            + m.execute()
            + m.message(m.SYNC)
            + m.message(m.COPY_DATA, b"4\n")
            + m.message(m.COPY_DONE)
            + m.message(m.SYNC)
        )
        assert [t for t, _ in c.read_until_ready()] == ["1", "2", "G", "C", "Z"]
        assert rows_of(c.query("select sum(a) from t_copy_ahead")) == [["7"]]


def test_large_result_arrives_complete(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        cur = conn.execute("select g, repeat('x', 50) from generate_series(1, 100000) g")
        n = 0
        total = 0
        for g, x in cur:
            n += 1
            total += g
            assert len(x) == 50
        assert (n, total) == (100000, 5000050000)


def test_pipeline_mode_with_many_syncs(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.pipeline() as p:
        cursors = [conn.execute("select %s::int * 2", (i,)) for i in range(50)]
        p.sync()
        assert [c.fetchone() for c in cursors] == [(i * 2,) for i in range(50)]


def test_cancel_of_a_running_query(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        # cancel_safe: libpq's blocking PQcancel holds the GIL, which would starve the
        # in-process proxy thread that has to answer it.
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            with pytest.raises(pgerrors.QueryCanceled):
                conn.execute("select pg_sleep(20)")
        finally:
            timer.cancel()
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)


async def test_async_psycopg_and_asyncpg(proxy: ProxyThread) -> None:
    async with await psycopg.AsyncConnection.connect(proxy.dsn()) as aconn:
        cur = await aconn.execute("select %s::int", (7,))
        assert await cur.fetchone() == (7,)
    conn = await asyncpg.connect(proxy.dsn(), statement_cache_size=0)
    try:
        assert await conn.fetchval("select $1::int + 1", 1) == 2
        async with conn.transaction():
            await conn.execute("create temp table if not exists tt (x int)")
            await conn.execute("insert into tt values (1)")
            assert await conn.fetchval("select count(*) from tt") == 1
        rows = await conn.fetch("select g from generate_series(1, 1000) g")
        assert len(rows) == 1000
    finally:
        await conn.close()


def test_psql_runs_a_script(proxy: ProxyThread) -> None:
    psql = str(find_bindir() / "psql")
    out = subprocess.run(
        [psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", proxy.dsn()],
        input="select 1 + 1;\nbegin;\nselect 'in tx';\ncommit;\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.split() == ["2", "BEGIN", "in", "tx", "COMMIT"]


def test_many_clients_share_a_small_pool_without_crosstalk(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 5})

    async def client(i: int) -> None:
        conn = await psycopg.AsyncConnection.connect(
            proxy.dsn(application_name=f"c{i}", options=f"-c TimeZone=Etc/GMT-{i % 12}")
        )
        async with conn:
            for _ in range(5):
                async with conn.transaction():
                    cur = await conn.execute(
                        "select current_setting('application_name'), current_setting('TimeZone'),"
                        " %s::int",
                        (i,),
                    )
                    row = await cur.fetchone()
                    assert row == (f"c{i}", f"Etc/GMT-{i % 12}", i)

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(200)))

    asyncio.run(main())
    # This proxy's servers carry its clients' application_name (cN), synced on every link;
    # backends of other tests' proxies may still be exiting and are not counted.
    backends = pg.psql(
        "select count(*) from pg_stat_activity where backend_type = 'client backend'"
        " and application_name ~ '^c[0-9]+$'"
    )
    assert 1 <= int(backends) <= 5


def test_session_mode_keeps_session_state(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"pool_mode": "session", "default_pool_size": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True) as a:
        a.execute("create temp table mine (x int)")
        a.execute("insert into mine values (1)")
        a.execute("set search_path = pg_temp, public")
        pid = a.execute("select pg_backend_pid()").fetchone()
        for _ in range(3):
            assert a.execute("select pg_backend_pid()").fetchone() == pid
            assert a.execute("select count(*) from mine").fetchone() == (1,)
    # The next session gets a reset server: no temp table, default search_path.
    with psycopg.connect(proxy.dsn(), autocommit=True) as b:
        with pytest.raises(pgerrors.UndefinedTable):
            b.execute("select * from pg_temp.mine")
        b.rollback()
        assert b.execute("show search_path").fetchone() == ('"$user", public',)


def test_session_settings_follow_the_client_to_other_servers(make_proxy: MakeProxy) -> None:
    """SET application_name / TimeZone / search_path once; a later transaction runs on a
    different server and still sees them."""
    proxy = make_proxy(proxy={"default_pool_size": 2})
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        a.execute("SET application_name = 'tenant-a'")
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        a.execute("SET search_path = pg_catalog, public")
        a.execute("SET statement_timeout = '7s'")
        first = a.execute("select pg_backend_pid()").fetchone()
        with b.transaction():  # hold that server, so a's next query gets the other one
            b.execute("select 1")
            assert b.execute("select pg_backend_pid()").fetchone() == first
            row = a.execute(
                "select pg_backend_pid(), current_setting('application_name'),"
                " current_setting('TimeZone'), current_setting('search_path'),"
                " current_setting('statement_timeout')"
            ).fetchone()
            assert row is not None and first is not None
            assert row[0] != first[0]
            assert row[1:] == ("tenant-a", "Asia/Tokyo", "pg_catalog, public", "7s")
            # ... and they did not leak to the client that got a's old server.
            assert b.execute("show search_path").fetchone() == ('"$user", public',)
            assert b.execute("show statement_timeout").fetchone() == ("0",)


def test_set_rolled_back_and_reset_behave_as_in_postgres(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 2})
    with psycopg.connect(proxy.dsn(options="-c statement_timeout=3s")) as conn:
        conn.execute("SET search_path = pg_catalog")
        conn.rollback()  # a SET in a rolled-back transaction never happened
        conn.execute("SET statement_timeout = '9s'")
        conn.commit()
        conn.execute("RESET statement_timeout")  # back to the startup value, not the server's
        conn.commit()
        with psycopg.connect(proxy.dsn()) as other:  # pushes conn onto another server next
            other.execute("select 1")
            row = conn.execute(
                "select current_setting('search_path'), current_setting('statement_timeout')"
            ).fetchone()
            other.commit()
        assert row == ('"$user", public', "3s")


@pytest.mark.parametrize("size", [300_000, 5_000_000])
def test_large_parameters_and_queries(proxy: ProxyThread, size: int) -> None:
    """Bind and Query messages bigger than the proxy's buffers still go through whole."""
    blob = bytes(range(256)) * (size // 256)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute("select length(%s::bytea), md5(%s::bytea)", (blob, blob)).fetchone()
        import hashlib

        assert row == (len(blob), hashlib.md5(blob).hexdigest())
        text = "x" * size
        assert conn.execute(f"select length('{text}')").fetchone() == (size,)
        with conn.transaction():
            assert conn.execute("select length(%s::text)", (text,)).fetchone() == (size,)
