"""pg_listening_channels() through the proxy in transaction mode: in any query shape, through
the simple and the extended protocol, in prepared statements and in transactions, the client
sees what a direct connection to the same cluster sees (its own channels, column names and
types, row order), never a pooled server's or another client's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.listening_channels import rewrite
from pgproxy.params import quote_ident
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread

# The check pg-boss runs every few seconds (extended protocol, a bound parameter).
PG_BOSS = (
    "SELECT EXISTS (SELECT 1 FROM pg_listening_channels() AS active(channel) WHERE channel = $1)"
)
COUNT = "SELECT count(*) FROM pg_listening_channels()"
SHAPES = [
    "SELECT pg_listening_channels()",
    "select * from pg_catalog.pg_listening_channels();",
    "SELECT pg_listening_channels() AS c",
    "SELECT x FROM pg_listening_channels() x",
    COUNT,
    "SELECT EXISTS (SELECT FROM pg_listening_channels() AS a(channel) WHERE channel = 'a,b')",
    "select * from pg_listening_channels() with ordinality",
    'select pg_listening_channels()::varchar, pg_listening_channels() collate "C"',
    "select upper(pg_listening_channels())",
    "select (select pg_listening_channels() limit 1)",
    "select * from (select pg_listening_channels()) s",
    "select l, length(l) from pg_listening_channels() l join pg_listening_channels() r on l = r",
    "select array_agg(ch) from pg_listening_channels() ch",
    "select string_agg(pg_listening_channels, '|') from pg_listening_channels()",
    "with x as (select pg_listening_channels() as n) select n from x order by n",
    "select pg_listening_channels() order by pg_listening_channels desc",
    "select 'x' where 'zz' in (select pg_listening_channels())",
]
# Names Postgres keeps as they are: commas, quotes, backslashes, braces, spaces, unicode, the
# word NULL, 63 bytes (a longer name is cut to 63 bytes by both).
ODD_CHANNELS = [
    "zz",
    "a,b",
    'q"uote',
    "back\\slash",
    "{brace}",
    "sp ace",
    "ünïcødé ✓",
    "NULL",
    "it's",
    "x" * 63,
    "é" * 40,
]

Result = tuple[list[tuple[str, int]] | None, list[tuple[Any, ...]] | None]


def _result(cur: psycopg.Cursor[Any]) -> Result:
    if cur.description is None:
        return None, None
    return [(d.name, d.type_code) for d in cur.description], cur.fetchall()


class Twins:
    """The same statements on a direct connection and on one through the proxy."""

    def __init__(self, pg: PgCluster, proxy: ProxyThread, autocommit: bool = True) -> None:
        self.direct = psycopg.connect(pg.dsn(), autocommit=autocommit)
        self.proxied = psycopg.connect(proxy.dsn(), autocommit=autocommit)

    def run(self, sql: str, params: tuple[Any, ...] | None = None, **kw: Any) -> Result:
        """Run on both; the proxied result, asserted equal to the direct one."""
        want = _result(self.direct.execute(sql, params, **kw))
        got = _result(self.proxied.execute(sql, params, **kw))
        assert got == want, sql
        return got

    def listen(self, *channels: str) -> None:
        for channel in channels:
            self.run(f"LISTEN {quote_ident(channel)}")

    def close(self) -> None:
        self.direct.close()
        self.proxied.close()


@pytest.fixture
def twins(pg: PgCluster, proxy: ProxyThread) -> Iterator[Twins]:
    pair = Twins(pg, proxy)
    yield pair
    pair.close()


def _every_way(twins: Twins) -> None:
    """Every shape as a simple Query, as a prepared statement, and with a bound parameter."""
    for sql in SHAPES:
        twins.run(sql)
        twins.run(sql, prepare=True)
    for channel in ("zz", "a,b", "absent", "x" * 63):
        twins.run(PG_BOSS.replace("$1", "%s"), (channel,))
        twins.run(PG_BOSS.replace("$1", "%s"), (channel,), prepare=True)


def test_every_shape_matches_a_direct_connection(twins: Twins) -> None:
    _every_way(twins)  # no channel yet
    twins.listen(*ODD_CHANNELS)
    rows = twins.run("SELECT pg_listening_channels()")[1]
    # In LISTEN order, names as they were (cut to 63 bytes on a character boundary).
    assert rows == [(c.encode()[:63].decode(errors="ignore"),) for c in ODD_CHANNELS]
    _every_way(twins)
    # Prepared statements executed again while the channel set changes.
    twins.run("UNLISTEN zz")
    twins.run('LISTEN "zz"; LISTEN "fresh"; UNLISTEN "a,b"')
    _every_way(twins)
    twins.run("UNLISTEN *")
    _every_way(twins)
    twins.listen("after", "discard")
    _every_way(twins)
    twins.run("DISCARD ALL")  # UNLISTEN * too
    _every_way(twins)


def test_visibility_follows_transactions(pg: PgCluster, proxy: ProxyThread) -> None:
    twins = Twins(pg, proxy, autocommit=False)
    try:
        for conn in (twins.direct, twins.proxied):
            conn.execute("LISTEN first")
            conn.commit()
        checks = (SHAPES[0], COUNT)

        def check() -> None:
            for sql in checks:
                twins.run(sql)
                twins.run(sql, prepare=True)
            twins.run(PG_BOSS.replace("$1", "%s"), ("second",), prepare=True)

        twins.run("LISTEN second")
        twins.run("UNLISTEN first")
        check()  # the open transaction's LISTEN/UNLISTEN are not seen yet
        assert twins.run(COUNT)[1] == [(1,)]
        for conn in (twins.direct, twins.proxied):
            conn.commit()
        check()
        assert twins.run(SHAPES[0])[1] == [("second",)]
        for conn in (twins.direct, twins.proxied):
            conn.commit()

        twins.run("LISTEN rolled_back")
        check()
        for conn in (twins.direct, twins.proxied):
            conn.rollback()
        check()
        assert twins.run(SHAPES[0])[1] == [("second",)]

        twins.run("SAVEPOINT s")
        twins.run("LISTEN undone")
        twins.run("ROLLBACK TO SAVEPOINT s")
        twins.run("LISTEN kept")
        for conn in (twins.direct, twins.proxied):
            conn.commit()
        check()
        assert twins.run(SHAPES[0])[1] == [("second",), ("kept",)]
    finally:
        twins.close()


def test_first_prepared_use_inside_a_transaction(pg: PgCluster, proxy: ProxyThread) -> None:
    """A client that LISTENed and first runs a prepared statement reading the channels in an
    open transaction sees them there, and after it."""
    twins = Twins(pg, proxy, autocommit=False)
    try:
        for conn in (twins.direct, twins.proxied):
            conn.execute("LISTEN jobs")
            conn.commit()
            conn.execute("SELECT 1")
        twins.run(PG_BOSS.replace("$1", "%s"), ("jobs",), prepare=True)
        twins.run(COUNT, prepare=True)
        for conn in (twins.direct, twins.proxied):
            conn.rollback()
        assert twins.run(PG_BOSS.replace("$1", "%s"), ("jobs",), prepare=True)[1] == [(True,)]
    finally:
        twins.close()


def test_a_pooled_server_does_not_carry_one_clients_channels_to_another(
    pg: PgCluster, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy({"default_pool_size": 1})
    boss = PG_BOSS.replace("$1", "%s")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True) as other,
        psycopg.connect(proxy.dsn(), autocommit=True) as never,
    ):
        listener.execute("LISTEN mine")
        assert listener.execute(boss, ("mine",), prepare=True).fetchone() == (True,)
        other.execute("LISTEN theirs")
        assert other.execute(COUNT, prepare=True).fetchone() == (1,)
        assert other.execute(boss, ("mine",), prepare=True).fetchone() == (False,)
        # One server served all three: the client that never LISTENed sees no channel.
        for prepare in (False, True):
            assert never.execute(boss, ("mine",), prepare=prepare).fetchone() == (False,)
            assert never.execute(COUNT, prepare=prepare).fetchone() == (0,)
            assert never.execute(SHAPES[0], prepare=prepare).fetchall() == []
        assert listener.execute(SHAPES[0], prepare=True).fetchall() == [("mine",)]
        assert other.execute(SHAPES[0], prepare=True).fetchall() == [("theirs",)]
        listener.execute("UNLISTEN *")
        assert listener.execute(boss, ("mine",), prepare=True).fetchone() == (False,)
    stats = proxy.call(lambda p: [pool.counts() for pool in p.pools.values()])
    assert stats, "the proxy pooled nothing"


async def _asyncpg_view(con: asyncpg.Connection) -> list[Any]:
    """What asyncpg (prepared statements, binary results) sees of the channels."""
    out: list[Any] = []
    for channel in ("jobs", "other", "absent"):
        out.append(await con.fetchval(PG_BOSS, channel))
    out.append(await con.fetchval(COUNT))
    stmt = await con.prepare("SELECT * FROM pg_listening_channels()")
    out.append([(a.name, a.type.oid) for a in stmt.get_attributes()])
    out.append(await stmt.fetch())
    return out


async def test_asyncpg_prepared_statements_follow_the_channels(
    pg: PgCluster, proxy: ProxyThread
) -> None:
    direct = await asyncpg.connect(pg.dsn())
    proxied = await asyncpg.connect(proxy.dsn())
    try:
        for steps in (
            [],
            ["LISTEN jobs"],
            ["LISTEN other", "LISTEN jobs"],
            ["UNLISTEN jobs"],
            ["LISTEN jobs"],
            ["UNLISTEN *"],
        ):
            for con in (direct, proxied):
                for step in steps:
                    await con.execute(step)
            assert await _asyncpg_view(proxied) == await _asyncpg_view(direct), steps
        async with direct.transaction(), proxied.transaction():
            for con in (direct, proxied):
                await con.execute("LISTEN jobs")
            assert await _asyncpg_view(proxied) == await _asyncpg_view(direct)
        assert await _asyncpg_view(proxied) == await _asyncpg_view(direct)
        assert await proxied.fetchval(PG_BOSS, "jobs") is True
    finally:
        await direct.close()
        await proxied.close()


@pytest.mark.parametrize("autocommit", [True, False])
def test_first_prepared_use_in_a_pipeline(
    pg: PgCluster, proxy: ProxyThread, autocommit: bool
) -> None:
    """The first statement reading the channels sent in one batch behind other work (psycopg's
    pipeline; pgjdbc sends BEGIN so) sees them."""
    boss = PG_BOSS.replace("$1", "%s")
    for dsn in (pg.dsn(), proxy.dsn()):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("LISTEN jobs")
            conn.autocommit = autocommit
            with conn.pipeline():
                conn.execute("SELECT 1")
                first = conn.execute(boss, ("jobs",), prepare=True)
                count = conn.execute(COUNT)
            assert first.fetchone() == (True,), dsn
            assert count.fetchone() == (1,), dsn


def test_session_mode_answers_the_same(pg: PgCluster, make_proxy: MakeProxy) -> None:
    twins = Twins(pg, make_proxy({"pool_mode": "session"}))
    try:
        twins.listen(*ODD_CHANNELS[:4])
        _every_way(twins)
    finally:
        twins.close()


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE VIEW v AS SELECT pg_listening_channels()",  # stored: would freeze the list
        "CREATE MATERIALIZED VIEW v AS SELECT pg_listening_channels()",
        "PREPARE p AS SELECT pg_listening_channels()",
        "CREATE FUNCTION f() RETURNS SETOF text BEGIN ATOMIC SELECT pg_listening_channels(); END",
        "SELECT 'pg_listening_channels()' -- pg_listening_channels()",
        "SELECT pg_listening_channels(1)",  # the server's own error
        "SELECT pg_listening_channels() OVER ()",
        "SELECT myschema.pg_listening_channels()",
        "SELECT pgproxy_listening_channels_marker, pg_listening_channels()",
        "SELECT pg_listening_channels(",
    ],
)
def test_left_to_the_server(sql: str) -> None:
    assert rewrite(sql) is None


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "CREATE TABLE t AS SELECT pg_listening_channels()",
            "CREATE TABLE t AS SELECT pg_catalog.unnest(ARR) AS pg_listening_channels",
        ),
        (
            "/* keep */ select 1;\nEXPLAIN ANALYZE SELECT * FROM pg_listening_channels() c",
            "/* keep */ select 1;\nEXPLAIN (analyze) SELECT * FROM pg_catalog.unnest(ARR) AS c",
        ),
    ],
)
def test_rewritten_text(sql: str, expected: str) -> None:
    rewritten = rewrite(sql)
    assert rewritten is not None and rewritten.text("ARR") == expected
