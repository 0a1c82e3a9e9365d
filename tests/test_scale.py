"""Scale (issue item 8): 1,000 LISTENing clients through one proxy use ONE upstream listener.

1,000 psycopg AsyncConnections (one asyncio loop, opened 50 at a time) each LISTEN on three
channels through an in-process proxy in transaction mode with a pool of 5, against the
shared test cluster (max_connections 100, so 1,000 direct listeners could not even connect).
pg_stat_activity must show exactly one ``pgproxy-listener`` backend and at most 5 other
backends of the proxy; one NOTIFY on each channel must reach every client exactly once.
The time from the NOTIFY to the last client receiving it is printed (fan-out timing).

The clients log in as ``app`` to database ``app`` so the proxy's backends are told apart
from anything else on the shared cluster by ``usename``/``datname``.

Run: .venv/bin/pytest -q -m slow tests/test_scale.py -p no:cacheprovider --timeout 300
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Iterator

import psycopg
import pytest

from pgproxy.testing.cluster import APP_DB, APP_USER, PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread

CLIENTS = 1000
CHANNELS = ("scale_a", "scale_b", "scale_c")
CONCURRENCY = 50
# One socket per client on each side of the in-process proxy, plus upstream and slack.
NEED_FILES = 2200

pytestmark = pytest.mark.slow

Conn = psycopg.AsyncConnection[tuple[object, ...]]


@pytest.fixture
def enough_files() -> Iterator[None]:
    """Soft RLIMIT_NOFILE raised as far as the hard limit allows (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEED_FILES:
        pytest.skip(
            f"RLIMIT_NOFILE hard limit is {hard}: {CLIENTS} clients need about {NEED_FILES} "
            "file descriptors in this process (client and proxy side of every connection)"
        )
    want = hard if hard != resource.RLIM_INFINITY else max(NEED_FILES * 2, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _backends(pg: PgCluster) -> tuple[int, int]:
    """(pgproxy-listener backends, other client backends) of the proxy's user/database."""
    out = pg.psql(
        "select count(*) filter (where application_name = 'pgproxy-listener'),"
        " count(*) filter (where application_name <> 'pgproxy-listener')"
        " from pg_stat_activity where backend_type = 'client backend'"
        f" and pid <> pg_backend_pid() and usename = '{APP_USER}' and datname = '{APP_DB}'"
    )
    listener, other = out.split("|")
    return int(listener), int(other)


def _listener_stats(proxy: ProxyThread) -> list[dict[str, int]]:
    return proxy.call(lambda p: [lst.stats() for lst in p.listeners.values()])


async def _open(dsn: str, sem: asyncio.Semaphore) -> Conn:
    async with sem:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, prepare_threshold=None, connect_timeout=30
        )
        try:
            for channel in CHANNELS:
                await conn.execute(f"LISTEN {channel}")  # simple Query: the fast path
        except BaseException:
            await conn.close()
            raise
        return conn


async def _receive(conn: Conn, inbox: list[tuple[str, str, float]]) -> None:
    async for note in conn.notifies(timeout=30, stop_after=len(CHANNELS)):
        inbox.append((note.channel, note.payload, time.perf_counter()))


async def _nothing_more(conn: Conn, inbox: list[tuple[str, str, float]]) -> None:
    async for note in conn.notifies(timeout=0.5):
        inbox.append((note.channel, note.payload, time.perf_counter()))


@pytest.mark.timeout(300)
async def test_thousand_listeners_share_one_upstream_listener(
    make_proxy: MakeProxy,
    pg: PgCluster,
    enough_files: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # max_client_conn stays at its default, 1000: exactly these clients.
    proxy = make_proxy(proxy={"default_pool_size": 5})
    dsn = proxy.dsn(user=APP_USER, dbname=APP_DB)
    sem = asyncio.Semaphore(CONCURRENCY)
    conns: list[Conn] = []
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_open(dsn, sem) for _ in range(CLIENTS)), return_exceptions=True
        )
        connect_s = time.perf_counter() - t0
        conns = [r for r in results if isinstance(r, psycopg.AsyncConnection)]
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} clients failed; first: {failures[0]!r}"

        listener, other = await asyncio.to_thread(_backends, pg)
        assert listener == 1, f"{listener} pgproxy-listener backends"
        assert other <= 5, f"{other} pooled backends for {CLIENTS} listening clients"
        stats = await asyncio.to_thread(_listener_stats, proxy)
        assert [(s["channels"], s["subscribers"]) for s in stats] == [(len(CHANNELS), CLIENTS)]

        inboxes: list[list[tuple[str, str, float]]] = [[] for _ in conns]
        tasks = [
            asyncio.create_task(_receive(c, box)) for c, box in zip(conns, inboxes, strict=True)
        ]
        await asyncio.sleep(0.5)  # every client is waiting in notifies()
        async with await psycopg.AsyncConnection.connect(
            pg.dsn(dbname=APP_DB), autocommit=True
        ) as direct:
            sent = time.perf_counter()
            # One transaction, one NOTIFY per channel: all three fire at its commit.
            await direct.execute("; ".join(f"NOTIFY {c}, '{c}!'" for c in CHANNELS))
        await asyncio.gather(*tasks)
        await asyncio.gather(
            *(_nothing_more(c, box) for c, box in zip(conns, inboxes, strict=True))
        )

        want = sorted((c, f"{c}!") for c in CHANNELS)
        wrong = [i for i, box in enumerate(inboxes) if sorted(n[:2] for n in box) != want]
        assert not wrong, (
            f"{len(wrong)} of {CLIENTS} clients did not get exactly the {len(CHANNELS)} "
            f"notifications; e.g. client {wrong[0]}: {[n[:2] for n in inboxes[wrong[0]]]}"
        )
        # When each client had all of its notifications, from just before the NOTIFY was sent.
        done = sorted(max(n[2] for n in box) - sent for box in inboxes)
        first, median, last = done[0], done[len(done) // 2], done[-1]

        listener, other = await asyncio.to_thread(_backends, pg)
        assert listener == 1, f"{listener} pgproxy-listener backends after the NOTIFY"
        assert other <= 5, f"{other} pooled backends after the NOTIFY"
        with capsys.disabled():
            print(
                f"\n[scale] {CLIENTS} clients x {len(CHANNELS)} channels connected and "
                f"LISTENing in {connect_s:.2f} s ({CONCURRENCY} at a time); upstream: "
                f"{listener} pgproxy-listener backend + {other} pooled.\n"
                f"[scale] NOTIFY (one transaction, {len(CHANNELS)} channels) -> a client has all "
                f"{len(CHANNELS)}: first {first * 1000:.1f} ms, median {median * 1000:.1f} ms, "
                f"LAST of {CLIENTS} {last * 1000:.1f} ms; {CLIENTS * len(CHANNELS)} deliveries, "
                "each exactly once (proxy in-process: it shares the GIL with the clients)."
            )
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
