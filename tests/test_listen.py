"""LISTEN/NOTIFY through the proxy in transaction mode: what a listening client sees."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import weakref
from collections import deque

import psycopg
import pytest

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, error_of, rows_of


def _listener(proxy: ProxyThread, *channels: str) -> psycopg.Connection:
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    for c in channels:
        conn.execute(f"LISTEN {c}")
    return conn


# psycopg drops the rest of a received batch if its notifies() generator is closed early,
# so every batch is consumed whole into a per-connection inbox.
_INBOXES: weakref.WeakKeyDictionary[psycopg.Connection, deque[psycopg.Notify]] = (
    weakref.WeakKeyDictionary()
)


def _inbox(conn: psycopg.Connection) -> deque[psycopg.Notify]:
    return _INBOXES.setdefault(conn, deque())


def _collect(conn: psycopg.Connection, count: int, timeout: float = 10.0) -> list[psycopg.Notify]:
    box = _inbox(conn)
    deadline = time.monotonic() + timeout
    while len(box) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        box.extend(list(conn.notifies(timeout=remaining, stop_after=count - len(box))))
    return [box.popleft() for _ in range(min(count, len(box)))]


def _next(conn: psycopg.Connection, timeout: float = 5.0) -> psycopg.Notify:
    got = _collect(conn, 1, timeout)
    if not got:
        raise AssertionError("no notification arrived")
    return got[0]


def _nothing(conn: psycopg.Connection, timeout: float = 0.3) -> None:
    box = _inbox(conn)
    box.extend(list(conn.notifies(timeout=timeout)))
    assert not box, list(box)


def _pool_stats(proxy: ProxyThread) -> dict[str, dict[str, int]]:
    return proxy.call(lambda p: {pool.name: pool.counts() for pool in p.pools.values()})


def _until_proxy_received(proxy: ProxyThread, count: int) -> None:
    """Wait until the proxy's listeners have read ``count`` notifications from upstream."""
    deadline = time.monotonic() + 10
    while proxy.call(lambda p: sum(lst.notifications for lst in p.listeners.values())) < count:
        assert time.monotonic() < deadline, "the notification never reached the proxy"
        time.sleep(0.01)


def _listener_channels(proxy: ProxyThread) -> set[str]:
    return proxy.call(lambda p: {c for lst in p.listeners.values() for c in lst.channels})


@pytest.mark.parametrize("payload", ["hello", "", "héllo wörld ✓", "x" * 7999])
def test_notification_reaches_a_listening_client(
    proxy: ProxyThread, pg: PgCluster, payload: str
) -> None:
    with _listener(proxy, "jobs") as conn, psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute("select pg_notify('jobs', %s)", (payload,))
        n = _next(conn)
        assert (n.channel, n.payload) == ("jobs", payload)


def test_notify_through_the_proxy_reaches_other_clients(proxy: ProxyThread) -> None:
    with _listener(proxy, "events") as a, _listener(proxy, "events") as b:
        with psycopg.connect(proxy.dsn(), autocommit=True) as sender:
            sender.execute("NOTIFY events, 'one'")
        assert _next(a).payload == "one"
        assert _next(b).payload == "one"


def test_listen_on_the_fast_path_uses_no_pooled_server(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 2})
    holder = psycopg.connect(proxy.dsn())
    holder.execute("select 1")  # the pool's only server, held inside a transaction
    conns = [_listener(proxy, "a", "b") for _ in range(10)]
    try:
        assert _listener_channels(proxy) == {"a", "b"}
        assert _pool_stats(proxy)["postgres/postgres"]["waiting"] == 0
    finally:
        holder.close()
        for c in conns:
            c.close()


def test_channel_names_follow_identifier_rules(proxy: ProxyThread, pg: PgCluster) -> None:
    with _listener(proxy, "Foo") as folded, _listener(proxy, '"Foo"') as quoted:
        with psycopg.connect(pg.dsn(), autocommit=True) as direct:
            direct.execute("NOTIFY foo, 'lower'")
            direct.execute("NOTIFY \"Foo\", 'upper'")
        assert _next(folded).payload == "lower"
        assert _next(quoted).payload == "upper"
        _nothing(folded)
        _nothing(quoted)


def test_long_channel_names_are_truncated_like_postgres(proxy: ProxyThread, pg: PgCluster) -> None:
    long = "c" * 70
    with _listener(proxy, long) as conn, psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute(f"NOTIFY {'c' * 63}, 'truncated'")
        assert _next(conn).channel == "c" * 63


@pytest.mark.parametrize("name", ['"x""; DROP TABLE t; --"', '"a;b c"', '"ünï🦄"'])
def test_hostile_channel_names_are_only_names(proxy: ProxyThread, pg: PgCluster, name: str) -> None:
    pg.psql("drop table if exists t; create table t (x int)")
    real = name[1:-1].replace('""', '"')
    with _listener(proxy, name) as conn, psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute("select pg_notify(%s, 'p')", (real,))
        assert _next(conn).channel == real
    assert pg.psql("select count(*) from t") == "0"  # the table is still there


def test_duplicate_listen_delivers_once_and_one_unlisten_ends_it(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    with _listener(proxy, "dup", "dup") as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        d.execute("NOTIFY dup, '1'")
        assert _next(conn).payload == "1"
        _nothing(conn)
        conn.execute("UNLISTEN dup")
        d.execute("NOTIFY dup, '2'")
        _nothing(conn)


def test_unlisten_star_and_multi_statement_subscriptions(proxy: ProxyThread, pg: PgCluster) -> None:
    with _listener(proxy) as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        conn.execute("LISTEN a; LISTEN b; UNLISTEN a")
        d.execute("NOTIFY a, 'no'")
        d.execute("NOTIFY b, 'yes'")
        assert _next(conn).channel == "b"
        _nothing(conn)
        conn.execute("UNLISTEN *")
        d.execute("NOTIFY b, 'no'")
        _nothing(conn)
    assert _listener_channels(proxy) == set()


def test_listen_is_in_effect_when_acknowledged(proxy: ProxyThread, pg: PgCluster) -> None:
    """LISTEN, then read state: a NOTIFY committed right after the ack must arrive."""
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        for i in range(40):
            with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
                conn.execute(f"LISTEN fresh_{i}")
                direct.execute(f"NOTIFY fresh_{i}, '{i}'")
                assert _next(conn).payload == str(i)


def test_notifications_wait_until_the_transaction_ends(proxy: ProxyThread, pg: PgCluster) -> None:
    with RawClient(proxy.port) as c, psycopg.connect(pg.dsn(), autocommit=True) as d:
        c.login()
        assert [t for t, _ in c.query("LISTEN tx")] == ["C", "Z"]
        assert [t for t, _ in c.query("BEGIN")] == ["C", "Z"]
        d.execute("NOTIFY tx, 'held'")
        _until_proxy_received(proxy, 1)
        # Inside the transaction nothing arrives, even across further statements.
        assert [t for t, _ in c.query("SELECT 1")] == ["T", "D", "C", "Z"]
        reply = c.query("COMMIT")
        assert [t for t, _ in reply] == ["C", "A", "Z"]
        assert m.parse_notification(reply[1][1]).payload == "held"
        assert reply[-1][1] == b"I"


def test_notify_inside_a_transaction_is_delivered_at_commit_only(proxy: ProxyThread) -> None:
    with _listener(proxy, "q") as conn, psycopg.connect(proxy.dsn()) as sender:
        sender.execute("NOTIFY q, 'rolled back'")
        sender.rollback()
        sender.execute("NOTIFY q, 'same'")
        sender.execute("NOTIFY q, 'same'")  # duplicates inside one transaction collapse
        sender.execute("NOTIFY q, 'other'")
        _nothing(conn)
        sender.commit()
        assert [_next(conn).payload, _next(conn).payload] == ["same", "other"]
        _nothing(conn)


def test_sequenced_notifications_arrive_exactly_once_in_order(proxy: ProxyThread) -> None:
    listeners = [_listener(proxy, "seq") for _ in range(5)]
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as sender:
            sender.execute("select pg_notify('seq', g::text) from generate_series(1, 1000) g")
        for conn in listeners:
            got = [int(n.payload) for n in _collect(conn, 1000)]
            assert got == list(range(1, 1001))
            _nothing(conn)
    finally:
        for conn in listeners:
            conn.close()


def test_many_listeners_cost_one_upstream_connection(make_proxy: MakeProxy, pg: PgCluster) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 5})

    async def main() -> None:
        conns = [
            await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) for _ in range(200)
        ]
        try:
            await asyncio.gather(*(c.execute("LISTEN many_a; LISTEN many_b") for c in conns))
            listeners = pg.psql(
                "select count(*) from pg_stat_activity where application_name = 'pgproxy-listener'"
            )
            assert listeners == "1"
            async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as d:
                await d.execute("NOTIFY many_b, 'all'")

            async def one(c: psycopg.AsyncConnection) -> str:
                async for n in c.notifies(timeout=10, stop_after=1):
                    return n.payload
                return "nothing"

            assert await asyncio.gather(*(one(c) for c in conns)) == ["all"] * 200
        finally:
            for c in conns:
                await c.close()

    asyncio.run(main())


def test_disconnect_leaves_the_registry_and_last_one_unlistens(proxy: ProxyThread) -> None:
    a = _listener(proxy, "gone", "kept")
    b = _listener(proxy, "kept")
    a.close()
    deadline = time.monotonic() + 5
    while _listener_channels(proxy) != {"kept"}:
        assert time.monotonic() < deadline, _listener_channels(proxy)
        time.sleep(0.02)
    b.close()


def test_slow_consumer_is_disconnected_and_others_get_everything(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    """A client that stops reading is cut off; readers that keep up lose nothing."""
    proxy = make_proxy(proxy={"notify_buffer_size": 1024 * 1024})
    stuck = RawClient(proxy.port)
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.login()
    stuck.query("LISTEN flood")
    batches, per_batch, payload = 40, 50, "p" * 7000  # 14 MB: more than any socket buffers

    async def main() -> list[list[str]]:
        readers = [
            await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) for _ in range(5)
        ]
        got: list[list[str]] = [[] for _ in readers]
        progress = asyncio.Condition()

        for r in readers:
            await r.execute("LISTEN flood")

        async def read(i: int) -> None:
            async for n in readers[i].notifies(timeout=30, stop_after=batches * per_batch):
                got[i].append(n.payload)
                async with progress:
                    progress.notify_all()

        tasks = [asyncio.create_task(read(i)) for i in range(len(readers))]
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as sender:
            for b in range(batches):
                await sender.execute(
                    "select pg_notify('flood', %s || g) from generate_series(1, %s) g",
                    (payload, per_batch),
                )
                # Pace the publisher by what the readers have received, not by time.
                async with progress:
                    await progress.wait_for(
                        lambda b=b: all(len(g) >= (b + 1) * per_batch for g in got)
                    )
        await asyncio.gather(*tasks)
        for r in readers:
            await r.close()
        return got

    try:
        got = asyncio.run(main())
        expected = [payload + str(g) for _ in range(batches) for g in range(1, per_batch + 1)]
        assert all(g == expected for g in got)
        # The stuck client was cut off: draining its socket ends in EOF or a reset.
        stuck.sock.settimeout(10)
        with pytest.raises((ConnectionResetError, AssertionError)):
            while True:
                msg = stuck.read_message()
                assert msg is not None
    finally:
        stuck.close()


def _listener_pid(pg: PgCluster) -> int:
    return int(
        pg.psql("select pid from pg_stat_activity where application_name = 'pgproxy-listener'")
    )


def test_listener_loss_disconnects_subscribers_and_recovers(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    conn = _listener(proxy, "lost")
    with RawClient(proxy.port) as raw:
        raw.login()
        raw.query("LISTEN lost")
        pg.psql(f"select pg_terminate_backend({_listener_pid(pg)})")
        # An idle subscriber is told at once (libpq shows the EOF, so check the bytes) ...
        [(kind, body)] = raw.read_all()
        fields = m.parse_error_fields(body)
        assert (kind, fields["S"], fields["C"]) == ("E", "FATAL", "57P01")
        assert "lost its listener connection" in fields["M"]
        # ... and so is every other one.
        with pytest.raises(psycopg.OperationalError):
            for _ in conn.notifies(timeout=10):
                pass
    conn.close()
    with _listener(proxy, "lost") as again, psycopg.connect(pg.dsn(), autocommit=True) as d:
        d.execute("NOTIFY lost, 'back'")
        assert _next(again).payload == "back"


def test_listener_loss_with_keep_policy_resubscribes(make_proxy: MakeProxy, pg: PgCluster) -> None:
    proxy = make_proxy(proxy={"listener_loss": "keep"})
    with _listener(proxy, "kept") as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        old = _listener_pid(pg)
        pg.psql(f"select pg_terminate_backend({old})")
        deadline = time.monotonic() + 10
        while True:  # the listener comes back by itself, with the channel re-LISTENed
            out = pg.psql(
                "select pid from pg_stat_activity where application_name = 'pgproxy-listener'"
            )
            if out and int(out) != old:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.execute("NOTIFY kept, 'again'")
        assert _next(conn, timeout=10).payload == "again"


def test_session_mode_passes_listen_through(make_proxy: MakeProxy, pg: PgCluster) -> None:
    proxy = make_proxy(proxy={"pool_mode": "session"})
    with _listener(proxy, "sess") as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        d.execute("NOTIFY sess, 'direct'")
        assert _next(conn).payload == "direct"


def test_listen_inside_a_transaction_does_not_leak_to_the_next_client(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    """Slow path: the pooled server that ran LISTEN is cleaned before anyone else gets it."""
    proxy = make_proxy(proxy={"default_pool_size": 1})
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("LISTEN slow")
        conn.commit()
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select pg_listening_channels()").fetchall() == []


def test_notify_sender_threads_and_listener_threads(proxy: ProxyThread) -> None:
    """Several senders at once: each listener gets every message, per-sender order kept."""
    listeners = [_listener(proxy, "mt") for _ in range(3)]

    def send(tag: str) -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True) as s:
            for i in range(100):
                s.execute("select pg_notify('mt', %s)", (f"{tag}:{i}",))

    threads = [threading.Thread(target=send, args=(t,)) for t in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for conn in listeners:
            got = [n.payload for n in _collect(conn, 300)]
            for tag in "xyz":
                assert [p for p in got if p.startswith(tag)] == [f"{tag}:{i}" for i in range(100)]
    finally:
        for conn in listeners:
            conn.close()


# --- slow path: LISTEN that runs on a pooled server ------------------------------------------


def _subscriber(proxy: ProxyThread) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn())


def test_listen_inside_a_committed_transaction_takes_effect(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    with _subscriber(proxy) as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        conn.execute("LISTEN in_tx")
        d.execute("NOTIFY in_tx, 'before commit'")  # not yet subscribed (README: Known limits)
        conn.commit()
        d.execute("NOTIFY in_tx, 'after commit'")
        got = [_next(conn).payload]
        if got == ["before commit"]:  # read by the listener only after the client joined
            got.append(_next(conn).payload)
        assert got[-1] == "after commit"
        _nothing(conn)


@pytest.mark.parametrize(
    "ending",
    [
        "ROLLBACK",
        "SELECT 1/0; COMMIT",  # COMMIT of a failed transaction answers ROLLBACK
        "SAVEPOINT s; SELECT 1/0; COMMIT",
    ],
)
def test_listen_in_a_rolled_back_transaction_never_happened(
    proxy: ProxyThread, pg: PgCluster, ending: str
) -> None:
    with RawClient(proxy.port) as c, psycopg.connect(pg.dsn(), autocommit=True) as d:
        c.login()
        c.query("BEGIN")
        c.query("LISTEN rb")
        for stmt in ending.split("; "):
            c.query(stmt)
        d.execute("NOTIFY rb, 'x'")
        # A query round trip later, nothing was delivered.
        assert [t for t, _ in c.query("SELECT 1")] == ["T", "D", "C", "Z"]
    assert _listener_channels(proxy) == set()


def test_listen_rolled_back_by_a_deferred_constraint_at_commit(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    pg.psql(
        "drop table if exists t_def; create table t_def (id int primary key,"
        " ref int references t_def(id) deferrable initially deferred)"
    )
    with _subscriber(proxy) as conn:
        conn.execute("LISTEN deferred")
        conn.execute("insert into t_def values (1, 999)")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.commit()
    assert _listener_channels(proxy) == set()


def test_listen_mixed_with_other_statements_in_one_query(proxy: ProxyThread, pg: PgCluster) -> None:
    with _listener(proxy) as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("LISTEN never; SELECT 1/0")
        conn.execute("LISTEN mixed; SELECT 1")
        d.execute("NOTIFY never, 'no'")
        d.execute("NOTIFY mixed, 'yes'")
        assert _next(conn).channel == "mixed"
        _nothing(conn)


def test_unlisten_in_a_rolled_back_transaction_keeps_listening(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    with _listener(proxy, "keep") as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        with conn.transaction(force_rollback=True):
            conn.execute("UNLISTEN keep")
        d.execute("NOTIFY keep, 'still'")
        assert _next(conn).payload == "still"


def test_discard_all_unlistens(proxy: ProxyThread, pg: PgCluster) -> None:
    with _listener(proxy, "disc") as conn, psycopg.connect(pg.dsn(), autocommit=True) as d:
        conn.execute("DISCARD ALL")
        d.execute("NOTIFY disc, 'no'")
        _nothing(conn)
    assert _listener_channels(proxy) == set()


def test_listen_through_psycopg_prepared_statements(proxy: ProxyThread, pg: PgCluster) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("LISTEN prep", prepare=True)  # Parse+Sync, then Bind/Describe/Execute/Sync
        with psycopg.connect(pg.dsn(), autocommit=True) as d:
            d.execute("NOTIFY prep, 'p'")
        assert _next(conn).payload == "p"


def test_listen_in_psycopg_pipeline_mode(proxy: ProxyThread, pg: PgCluster) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.pipeline():
            conn.execute("LISTEN pipe_a")
            conn.execute("LISTEN pipe_b")
            conn.execute("SELECT 1")
        with psycopg.connect(pg.dsn(), autocommit=True) as d:
            d.execute("NOTIFY pipe_b, 'b'")
        assert _next(conn).channel == "pipe_b"


@pytest.mark.parametrize("cache", [0, 100])
async def test_asyncpg_add_listener(proxy: ProxyThread, pg: PgCluster, cache: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(proxy.dsn(), statement_cache_size=cache)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await conn.add_listener("apg", lambda *args: received.put_nowait(args[3]))
        direct = await asyncpg.connect(pg.dsn())
        await direct.execute("NOTIFY apg, 'hello asyncpg'")
        await direct.close()
        assert await asyncio.wait_for(received.get(), 10) == "hello asyncpg"
    finally:
        await conn.close()


# --- self-notifications and PIDs ----------------------------------------------------------------


def test_own_notification_arrives_before_ready_with_the_virtual_pid(proxy: ProxyThread) -> None:
    with RawClient(proxy.port) as c:
        info = c.login()
        c.query("LISTEN self")
        reply = c.query("NOTIFY self, 'mine'")
        # As directly connected: the notification comes before this statement's ReadyForQuery.
        assert [t for t, _ in reply] == ["C", "A", "Z"]
        n = m.parse_notification(reply[1][1])
        assert (n.channel, n.payload, n.pid) == ("self", "mine", info["pid"])


def test_psycopg_backend_pid_filter_works(proxy: ProxyThread) -> None:
    with _listener(proxy, "who") as me, _listener(proxy, "who") as other:
        me.execute("NOTIFY who, 'from me'")
        other.execute("NOTIFY who, 'from other'")
        got = {n.payload: n.pid for n in _collect(me, 2)}
        assert got["from me"] == me.info.backend_pid
        assert got["from other"] == other.info.backend_pid != me.info.backend_pid


def test_skipping_own_notifications_never_hides_others_on_a_shared_server(
    make_proxy: MakeProxy,
) -> None:
    """Two clients take turns on one pooled server; each sees every one of the other's."""
    proxy = make_proxy(proxy={"default_pool_size": 1})
    a, b = _listener(proxy, "turns"), _listener(proxy, "turns")
    try:
        for i in range(30):
            a.execute("select pg_notify('turns', %s)", (f"a{i}",))
            b.execute("select pg_notify('turns', %s)", (f"b{i}",))
        for me, peer in ((a, "b"), (b, "a")):
            got = _collect(me, 60)
            others = [n.payload for n in got if n.pid != me.info.backend_pid]
            assert others == [f"{peer}{i}" for i in range(30)]
    finally:
        a.close()
        b.close()


def test_pg_listening_channels_answers_the_clients_own_channels(proxy: ProxyThread) -> None:
    with _listener(proxy, "zeta", '"Alpha"') as conn, _listener(proxy, "other") as peer:
        for form in (
            "SELECT pg_listening_channels()",
            "select * from pg_catalog.pg_listening_channels();",
        ):
            cur = conn.execute(form)
            assert cur.description is not None
            assert cur.description[0].name == "pg_listening_channels"
            assert cur.fetchall() == [("zeta",), ("Alpha",)]  # LISTEN order, as Postgres
        assert peer.execute("SELECT pg_listening_channels()").fetchall() == [("other",)]
        conn.execute("UNLISTEN *")
        assert conn.execute("SELECT pg_listening_channels()").fetchall() == []


def test_listen_syntax_error_is_postgres_own(proxy: ProxyThread) -> None:
    with _listener(proxy) as conn, pytest.raises(psycopg.errors.SyntaxError) as info:
        conn.execute("LISTEN 1bad")
    # The server's own report, with its error position context.
    assert info.value.sqlstate == "42601" and "LINE 1: LISTEN 1bad" in str(info.value)


def test_each_database_gets_its_own_listener(proxy: ProxyThread, pg: PgCluster) -> None:
    pg.psql("drop database if exists listen_other")
    pg.psql("create database listen_other")
    try:
        with (
            _listener(proxy, "same") as a,
            psycopg.connect(proxy.dsn(dbname="listen_other"), autocommit=True) as b,
        ):
            b.execute("LISTEN same")
            with psycopg.connect(pg.dsn(dbname="listen_other"), autocommit=True) as d:
                d.execute("NOTIFY same, 'other db'")
            assert _next(b).payload == "other db"
            _nothing(a)  # notifications are per database
            listeners = pg.psql(
                "select string_agg(datname, ',' order by datname) from pg_stat_activity"
                " where application_name = 'pgproxy-listener'"
            )
            assert listeners == "listen_other,postgres"
    finally:
        # The proxy's idle listener on listen_other would block DROP DATABASE.
        pg.psql(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = 'listen_other'"
        )
        pg.psql("drop database if exists listen_other")


@pytest.mark.parametrize(
    ("script", "listening"),
    [
        (["BEGIN", "SAVEPOINT s", "LISTEN sp_c", "ROLLBACK TO s", "COMMIT"], set()),
        (["BEGIN", "LISTEN sp_a", "SAVEPOINT s", "LISTEN sp_b", "ROLLBACK TO s", "COMMIT"],
         {"sp_a"}),
        (["BEGIN", "SAVEPOINT s", "LISTEN sp_c", "RELEASE s", "COMMIT"], {"sp_c"}),
        (["BEGIN", "SAVEPOINT s", "SAVEPOINT s", "LISTEN sp_c", "ROLLBACK TO s", "LISTEN sp_d",
          "ROLLBACK TO s", "RELEASE s", "COMMIT"], set()),
        (["BEGIN", "SAVEPOINT s", "LISTEN sp_c", "SAVEPOINT t", "RELEASE s", "COMMIT"], {"sp_c"}),
        (["BEGIN", "LISTEN sp_a", "SAVEPOINT s", "UNLISTEN sp_a", "ROLLBACK TO s", "COMMIT"],
         {"sp_a"}),
    ],
)  # fmt: skip
def test_listen_follows_savepoints(
    proxy: ProxyThread, script: list[str], listening: set[str]
) -> None:
    with RawClient(proxy.port) as c:
        c.login()
        for stmt in script:
            assert error_of(c.query(stmt)) is None, stmt
        reply = c.query("SELECT pg_listening_channels()")
        assert {row[0] for row in rows_of(reply)} == listening


def test_psycopg_nested_transaction_rollback_undoes_its_listen(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        with conn.transaction():
            conn.execute("LISTEN nest_outer")
            try:
                with conn.transaction():
                    conn.execute("LISTEN nest_inner")
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
        conn.commit()
        with psycopg.connect(pg.dsn(), autocommit=True) as d:
            d.execute("NOTIFY nest_inner, 'no'; NOTIFY nest_outer, 'yes'")
        assert _next(conn).channel == "nest_outer"
        _nothing(conn)


def test_psql_shows_asynchronous_notifications(proxy: ProxyThread) -> None:
    import subprocess

    from pgproxy.testing.cluster import find_bindir

    out = subprocess.run(
        [str(find_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", proxy.dsn()],
        input="LISTEN psql_chan;\nSELECT pg_notify('psql_chan', 'hi from psql');\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    import re

    found = re.search(
        r'Asynchronous notification "psql_chan" with payload "hi from psql" received from'
        r" server process with PID (\d+)\.",
        out.stdout,
    )
    assert found is not None, out.stdout
    assert int(found.group(1)) >= 1 << 22  # psql's own virtual PID, never a real backend's


def test_a_silently_dead_listener_is_noticed_and_replaced(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    """A NAT that forgot the connection: no FIN, no RST, nothing arrives. The ping notices,
    the listener reconnects and re-LISTENs, and notifications flow again (PROTOCOL-NOTES 35)."""
    from tests.support.relay import FreezableRelay

    def listener_pids() -> set[str]:
        out = pg.psql(
            "select pid from pg_stat_activity where application_name = 'pgproxy-listener'"
        )
        return set(out.split())

    with FreezableRelay(pg.port) as relay:
        proxy = make_proxy(
            proxy={
                "listener_ping_interval": 0.2,
                "listener_ping_timeout": 0.5,
                "listener_loss": "keep",
            },
            databases={"*": {"url": f"postgresql://127.0.0.1:{relay.port}"}},
        )
        with psycopg.connect(proxy.dsn(), autocommit=True) as client:
            client.execute("LISTEN relay_jobs")
            pg.psql("NOTIFY relay_jobs, 'before'")
            assert _next(client).payload == "before"
            before = listener_pids()
            relay.freeze_all()
            deadline = time.monotonic() + 15
            while not (listener_pids() - before):  # Postgres' view: no event to wait on
                assert time.monotonic() < deadline, "the listener was never replaced"
                time.sleep(0.05)
            live = proxy.call(
                lambda p: [lst.channels["relay_jobs"].ready for lst in p.listeners.values()]
            )
            assert live
            _wait_until_true(lambda: all(f.done() for f in live))
            pg.psql("NOTIFY relay_jobs, 'after'")
            assert _next(client).payload == "after"


def _wait_until_true(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_an_earlier_failed_unit_never_drops_a_later_extended_listen(
    proxy: ProxyThread, pg: PgCluster
) -> None:
    """A failed statement the pre-check flagged (no LISTEN in it) leaves no trace: the next
    unit's LISTEN, sent in the extended protocol to a pooled server, takes hold."""
    with RawClient(proxy.port) as c:
        c.login()
        assert error_of(c.query("SELECT 1/0 AS listen"))["C"] == "22012"
        c.send(m.parse("", "LISTEN after_error") + m.bind("", "") + m.execute() + m.message(m.SYNC))
        assert error_of(c.read_until_ready()) is None
        with psycopg.connect(pg.dsn(), autocommit=True) as direct:
            direct.execute("NOTIFY after_error, 'heard'")
        message = c.read_message()
        assert message is not None and message[0] == "A"
        assert message[1].endswith(b"after_error\0heard\0")


@pytest.mark.parametrize("name", ["C" * 70, '"Ünï' + "x" * 70 + '"'])
def test_a_truncated_channel_name_gets_postgres_notice(
    proxy: ProxyThread, pg: PgCluster, name: str
) -> None:
    """NOTICE 42622 as Postgres' scanner sends it, also when the proxy answers the LISTEN."""
    seen: dict[str, list[tuple[str | None, str | None]]] = {}
    for who, dsn in (("direct", pg.dsn()), ("proxy", proxy.dsn())):
        notices: list[tuple[str | None, str | None]] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.add_notice_handler(
                lambda d, into=notices: into.append((d.sqlstate, d.message_primary))
            )
            conn.execute(f"LISTEN {name}")
            conn.execute(f"UNLISTEN {name}")
        seen[who] = notices
    assert seen["proxy"] == seen["direct"]
    assert [state for state, _ in seen["proxy"]] == ["42622", "42622"]
