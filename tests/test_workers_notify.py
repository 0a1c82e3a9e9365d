"""``workers = 2``: LISTEN/NOTIFY exactly as with one process (pgproxy.pubsub.siblings).

pgproxy runs as a real process with two workers; clients are spread over both (the kernel
picks; which worker serves a connection is read from its virtual PID). Every client LISTENs and
NOTIFYs through psycopg and asyncpg, over servers the clients of each worker share; every
notification must carry its sender's ``backend_pid`` (that is what the drivers' own LISTEN/NOTIFY
tests compare), self-notifications included, and come in the order it was sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.app import vpid_owner
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from pgproxy.workers import peerwire
from tests.conftest import build_config
from tests.support.workers import WorkersProxy

WORKERS = 2
PER_WORKER = 3  # clients of each driver on each worker
SENT = 15  # notifications each client sends
CHANNEL = "w17"


@pytest.fixture(scope="module")
def running(pg: PgCluster) -> Iterator[WorkersProxy]:
    # Two servers per worker for six clients each: servers change hands between
    # notifications, so a PID is only ever right if attributed per commit.
    config = build_config(pg, proxy={"default_pool_size": 2 * WORKERS})
    proxy = WorkersProxy(config, WORKERS).start()
    try:
        yield proxy
    finally:
        proxy.stop()


async def _spread(make: Any, pid_of: Any, close: Any) -> dict[int, list[Any]]:
    """``PER_WORKER`` connections on each worker (the kernel spreads them; extras closed)."""
    by_worker: dict[int, list[Any]] = {i: [] for i in range(WORKERS)}
    for _ in range(300):
        conn = await make()
        owner = vpid_owner(pid_of(conn), WORKERS)
        assert owner is not None
        if len(by_worker[owner]) < PER_WORKER:
            by_worker[owner].append(conn)
        else:
            await close(conn)
        if all(len(c) == PER_WORKER for c in by_worker.values()):
            return by_worker
    raise AssertionError(f"300 connections, spread {[len(c) for c in by_worker.values()]}")


async def test_every_notification_carries_its_senders_pid_across_workers(
    running: WorkersProxy,
) -> None:
    async def psycopg_conn() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(running.dsn(), autocommit=True)

    async def asyncpg_conn() -> asyncpg.Connection:
        return await asyncpg.connect(running.dsn())

    async def close(conn: Any) -> None:
        await conn.close()

    ours = await _spread(psycopg_conn, lambda c: c.info.backend_pid, close)
    theirs = await _spread(asyncpg_conn, lambda c: c.get_server_pid(), close)
    pgs = [c for conns in ours.values() for c in conns]
    apgs = [c for conns in theirs.values() for c in conns]
    senders = len(pgs) + len(apgs)
    # Every client's received notifications: (payload, pid), in arrival order.
    inbox: dict[int, list[tuple[str, int]]] = {}
    done = asyncio.Event()
    expected = senders * SENT

    def arrived(me: int, payload: str, pid: int) -> None:
        inbox[me].append((payload, pid))
        if all(len(got) >= expected for got in inbox.values()):
            done.set()

    try:
        for conn in pgs:
            inbox[conn.info.backend_pid] = []
            await conn.execute(f"LISTEN {CHANNEL}")
        for conn in apgs:
            me = conn.get_server_pid()
            inbox[me] = []
            await conn.add_listener(
                CHANNEL, lambda _c, pid, _ch, payload, me=me: arrived(me, payload, pid)
            )

        async def read(conn: psycopg.AsyncConnection[Any]) -> None:
            # What came during its own statements waits in psycopg's backlog: read after.
            me = conn.info.backend_pid
            while len(inbox[me]) < expected:
                left = expected - len(inbox[me])
                async for n in conn.notifies(timeout=30, stop_after=left):
                    arrived(me, n.payload, n.pid)

        async def send_psycopg(conn: psycopg.AsyncConnection[Any]) -> None:
            me = conn.info.backend_pid
            for i in range(SENT):  # extended protocol, one transaction each
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{me}:{i}"))

        async def send_asyncpg(conn: asyncpg.Connection) -> None:
            me = conn.get_server_pid()
            for i in range(SENT):  # simple protocol; every third one in a transaction
                if i % 3:
                    await conn.execute(f"NOTIFY {CHANNEL}, '{me}:{i}'")
                else:
                    async with conn.transaction():
                        await conn.execute(f"NOTIFY {CHANNEL}, '{me}:{i}'")

        await asyncio.gather(*map(send_psycopg, pgs), *map(send_asyncpg, apgs))
        await asyncio.wait_for(asyncio.gather(*map(read, pgs), done.wait()), 60)
    finally:
        for conn in [*pgs, *apgs]:
            await conn.close()

    pids = set(inbox)
    assert {vpid_owner(pid, WORKERS) for pid in pids} == set(range(WORKERS))
    for me, got in inbox.items():
        assert len(got) == expected, me
        last: dict[int, int] = {}
        for payload, pid in got:
            sender, i = map(int, payload.split(":"))
            assert pid == sender, f"{me} got {payload} from {sender} with the PID {pid}"
            assert last.get(sender, -1) + 1 == i, f"{me} got {payload} out of order"
            last[sender] = i
        assert set(last) == pids and set(last.values()) == {SENT - 1}


def _on_worker(proxy: WorkersProxy, index: int) -> psycopg.Connection[Any]:
    for _ in range(300):
        conn = psycopg.connect(proxy.dsn(), autocommit=True)
        if vpid_owner(conn.info.backend_pid, WORKERS) == index:
            return conn
        conn.close()
    raise AssertionError(f"300 connections, none served by worker {index}")


def test_a_stopped_worker_costs_a_notifier_its_timeout_only(running: WorkersProxy) -> None:
    """A sibling that does not answer (SIGSTOP) delays a NOTIFY by the fence's timeout, is
    logged, and the notifier still gets its own notification, with its PID; the stopped one
    gets it when it runs again, and attribution across workers works again."""
    assert running.output is not None
    here, there = _on_worker(running, 0), _on_worker(running, 1)
    try:
        here.execute("LISTEN alone")
        there.execute("LISTEN alone")
        mark = running.output.mark()
        os.kill(running.pids[1], signal.SIGSTOP)
        try:
            here.execute("NOTIFY alone, 'stopped'")
            [n] = here.notifies(timeout=0.5, stop_after=1)  # came before the ReadyForQuery
            assert (n.payload, n.pid) == ("stopped", here.info.backend_pid)
            running.output.wait_for(r"worker 1's listener fence failed", mark)
        finally:
            os.kill(running.pids[1], signal.SIGCONT)
        # Not lost; and as the notifier's fence gave up on worker 1, its server may have had
        # another holder by the time worker 1 asked: the real PID then (never a wrong client's).
        [n] = there.notifies(timeout=10, stop_after=1)
        assert n.payload == "stopped"
        assert n.pid == here.info.backend_pid or vpid_owner(n.pid, WORKERS) is None
        here.execute("NOTIFY alone, 'running'")
        for conn in (here, there):
            [n] = conn.notifies(timeout=10, stop_after=1)
            assert (n.payload, n.pid) == ("running", here.info.backend_pid)
    finally:
        here.close()
        there.close()


# --------------------------------------------------------------------------- the channel


async def _read(data: bytes, how: Any = peerwire.read_request) -> Any:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await how(reader)


async def test_attribution_messages_parse_as_built_and_bounded() -> None:
    server = ("127.0.0.1", 5432, 4242)
    assert await _read(peerwire.servers_changed(1, True, [server])) == peerwire.ServersChanged(
        1, True, (server,)
    )
    assert await _read(peerwire.servers_request(3)) == peerwire.ServersAsked(3)
    assert await _read(peerwire.who_holds("h", 1, [7, 8])) == peerwire.WhoHolds("h", 1, (7, 8))
    assert await _read(peerwire.fence_request("h", 1, "db")) == peerwire.FenceAsked("h", 1, "db")
    assert await _read(peerwire.answered(None), peerwire.read_ack) is None
    assert await _read(peerwire.answered([server]), peerwire.read_servers) == (server,)
    vpids = await _read(peerwire.answered([5, 0]), lambda r: peerwire.read_vpids(r, 2))
    assert vpids == (5, 0)
    for bad, why in [
        (b"W\x00\x01\x00\x01", "too long"),  # 64 KiB + 1: never read
        (b'L\x00\x00\x00\x05["a"]', "bad servers request"),
        (b"L\x00\x00\x00\x11[" + b" " * 15 + b"]", "too long"),
        (b'F\x00\x00\x00\x0c["h",1,true]', "bad fence request"),
        (b'W\x00\x00\x00\x0c["h",1,[-1]]', "bad PID list"),
        (b'W\x00\x00\x00\x0d["h",1,[1.5]]', "bad PID list"),
        (b"O\x00\x00\x00\x0e[0,true,[[1]]]", "bad server list"),
        (b"O\x00\x00\x00\x0a[0,1,[[]]]", "bad servers message"),
    ]:
        with pytest.raises(m.ProtocolError, match=why):
            await _read(bad)
    with pytest.raises(m.ProtocolError, match="bad attribution answer"):
        await _read(peerwire.answered([5]), lambda r: peerwire.read_vpids(r, 2))
    with pytest.raises(m.ProtocolError, match="too long"):
        await _read(b"K\x00\x00\x00\x05false", peerwire.read_ack)
    too_many = peerwire.who_holds("h", 1, list(range(1025)))
    with pytest.raises(m.ProtocolError, match="bad PID list"):
        await _read(too_many)
