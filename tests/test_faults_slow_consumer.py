"""A slow consumer beside hundreds of fast listeners (issue 16).

Clients that LISTEN and then never read their socket (``stuck``) or read one small chunk every
50 ms (``slow``) sit beside hundreds of raw-protocol listeners (``tests/support/fleet.py``) on
the same channels while two publishers flood them through the proxy, round after round. Seen
from outside: every fast listener has each publisher's notifications exactly once and in order
at the end of every round, while the proxy still holds the stuck clients' backlogs (bounded by
``notify_buffer_size``; it never waits for them); the slow clients are then reset after a
correct prefix of the stream (README "Slow consumers"), counted in
``pgproxy_slow_consumer_disconnects_total``; and afterwards a new listener hears notifications
and no server stays taken.

The quick run (200 fast, 1 stuck, 1 slow; in-process proxy, so each client's backlog can be
read) is in the normal suite. The full one (1,000 fast, 10 stuck, 10 slow; pgproxy as a real
process, its memory measured) is opt-in:

    PGPROXY_SOAK=1 .venv/bin/pytest -q -s -m slow tests/test_faults_slow_consumer.py
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import free_port, raise_nofile
from tests.conftest import MakeProxy
from tests.support.fleet import Fleet, Listener, open_fleet, open_listener, publish_sql
from tests.support.load import hears_after_listen, no_server_stays_taken, servers_in_use
from tests.support.process import accepting, memory_kib, pgproxy_output
from tests.support.proxy_runner import ProxyThread
from tests.test_metrics_truth import sample
from tests.test_ops_http import _families, metrics_port

CHANNELS = ("flood_a", "flood_b")
BUFFER = 1024 * 1024  # notify_buffer_size (the default): several rounds fit in it
READ_CHUNK = 256 * 1024  # the most one upstream read hands a client at once
PER_ROUND, PAD = 100, 1000  # notifications per publisher per round, padding bytes each

Addr = tuple[str, int]


@dataclass
class Flood:
    fast: list[Listener]
    slow: list[Listener]  # the stuck ones first
    sent: int = 0
    rounds: int = 0
    cut_after: int = 0  # rounds until every slow client was cut off
    max_lag: float = 0.0  # seconds from a commit to a fast listener having it, at worst
    rounds_held: int = 0  # rounds all fast listeners had in full while a stuck one was held
    most_held: int = 0  # the most bytes the proxy held for one client
    rss_kib: list[int] = field(default_factory=list)  # the proxy's RSS after each round


async def _all_have(fleet: Fleet, listeners: list[Listener], total: int) -> None:
    """Until the stream holds ``total`` notifications and every listener has all of them.
    (Polled: the state is spread over hundreds of protocol objects.)"""
    deadline = time.monotonic() + 60
    while not (
        sum(fleet.log.next_seq.values()) >= total
        and all(lst.offset == len(fleet.log.data) for lst in listeners)
    ):
        stopped = [lst.ended for lst in listeners if lst.ended]
        assert not stopped, f"a fast listener stopped: {stopped[0]}"
        assert time.monotonic() < deadline, "the fast listeners stopped getting notifications"
        await asyncio.sleep(0.02)


async def flood(
    port: int,
    dsn: str,
    console_dsn: str,
    fast_count: int,
    stuck_count: int,
    slow_count: int,
    backlogs: Callable[[], dict[Addr, int]] | None = None,
    rss_kib: Callable[[], int] | None = None,
    more_rounds: int = 1,
) -> Flood:
    """Publish rounds until every stuck and slow client is cut off, then ``more_rounds``; what
    everyone saw. ``backlogs``: bytes the proxy holds per client address (in-process only)."""
    fleet = Fleet()
    stuck = [
        await open_listener(fleet, port, CHANNELS, rcvbuf=4096, stuck=True)
        for _ in range(stuck_count)
    ]
    slow = [
        await open_listener(fleet, port, CHANNELS, rcvbuf=4096, slow=0.05)
        for _ in range(slow_count)
    ]
    run = Flood(await open_fleet(fleet, port, CHANNELS, fast_count), stuck + slow)
    stuck_addrs = {lst.transport.get_extra_info("sockname") for lst in stuck}  # type: ignore[union-attr]
    publishers = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in CHANNELS]
    rounds_after_cut = 0
    try:
        while rounds_after_cut < more_rounds:
            cut = await asyncio.to_thread(_slow_consumers, console_dsn)
            assert cut == len(run.slow) or run.rounds < 200, f"only {cut} slow clients cut off"
            if cut == len(run.slow):
                run.cut_after = run.cut_after or run.rounds
                rounds_after_cut += 1
            first = run.rounds * PER_ROUND
            await asyncio.gather(
                *(
                    conn.execute(publish_sql(p, CHANNELS[p], first, PER_ROUND, PAD))
                    for p, conn in enumerate(publishers)
                )
            )
            run.rounds += 1
            run.sent += PER_ROUND * len(publishers)
            await _all_have(fleet, run.fast, run.sent)  # never waiting for the slow ones
            if backlogs is not None:
                held = await asyncio.to_thread(backlogs)
                run.most_held = max(run.most_held, *held.values())
                run.rounds_held += any(held.get(addr, 0) > 0 for addr in stuck_addrs)
            if rss_kib is not None:
                run.rss_kib.append(rss_kib())
    finally:
        for conn in publishers:
            await conn.close()
    if backlogs is not None:  # cut off: their backlogs are freed
        assert not stuck_addrs & set(await asyncio.to_thread(backlogs))
    for lst in stuck:
        lst.transport.resume_reading()  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(*(lst.closed for lst in run.slow)), 60)

    # Everyone saw the truth: the fast ones all of it, once and in order; the slow ones a
    # correct prefix, then their connection reset (the FATAL 53200 written after a backlog that
    # is never read cannot reach them), never silence.
    assert fleet.log.problems == []
    assert fleet.log.next_seq == {"0": run.sent // 2, "1": run.sent // 2}
    assert all(lst.ended is None and lst.wrong is None for lst in run.fast)
    for lst in run.slow:
        assert lst.wrong is None, lst.wrong
        assert lst.ended is not None and lst.ended.startswith("connection lost"), lst.ended
        assert lst.notifications < run.sent
    for lst in run.fast:
        lst.close()
    run.max_lag = fleet.max_lag
    return run


def _slow_consumers(console_dsn: str) -> int:
    with psycopg.connect(console_dsn, autocommit=True) as console:
        cur = console.execute("SHOW LISTENERS")
        names = [d.name for d in cur.description or ()]
        return sum(
            int(dict(zip(names, row, strict=True))["slow_consumer_disconnects"])
            for row in cur.fetchall()
        )


def _backlogs(proxy: ProxyThread) -> Callable[[], dict[Addr, int]]:
    """Bytes the proxy holds for each logged-in client (written, not yet taken by its socket)."""

    def read(p: Any) -> dict[Addr, int]:
        return {
            c.transport.get_extra_info("peername"): c.transport.get_write_buffer_size()
            for c in p.clients.values()
            if c.transport is not None and not c.transport.is_closing()
        }

    return lambda: dict(proxy.call(read))


async def test_slow_consumers_are_cut_off_and_the_fast_ones_get_everything(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    proxy = make_proxy(
        proxy={
            "notify_buffer_size": BUFFER,
            "metrics_listen": "127.0.0.1:0",
            "admin_users": ["postgres"],
        }
    )
    console = proxy.dsn(dbname="pgbouncer")
    run = await flood(proxy.port, proxy.dsn(), console, 200, 1, 1, backlogs=_backlogs(proxy))
    assert run.rounds_held > 0, "the stuck client never had a backlog in the proxy"
    assert run.most_held <= BUFFER + READ_CHUNK, run.most_held
    families = await asyncio.to_thread(_families, metrics_port(proxy))
    db = {"database": "postgres"}
    assert sample(families, "pgproxy_slow_consumer_disconnects", "_total", **db) == 2
    assert sample(families, "pgproxy_notifications_dropped", "_total", **db) > 0
    await asyncio.to_thread(hears_after_listen, proxy.dsn(), pg.dsn(), "after_slow")
    await asyncio.to_thread(no_server_stays_taken, proxy)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not os.environ.get("PGPROXY_SOAK"), reason="opt-in: PGPROXY_SOAK=1")
async def test_slow_consumers_beside_a_thousand_listeners(
    pg: PgCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1,000 fast listeners, 10 stuck and 10 slow clients, pgproxy as a real process."""
    raise_nofile()
    port = free_port()
    config = tmp_path / "slow.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nlog_level = "warning"\n'
        f"default_pool_size = 5\nmax_client_conn = 1100\nnotify_buffer_size = {BUFFER}\n"
        'admin_users = ["postgres"]\n'
        f'[databases.postgres]\nurl = "postgresql://{pg.host}:{pg.port}/postgres"\n'
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    console = f"postgresql://postgres@127.0.0.1:{port}/pgbouncer"
    with pgproxy_output(config) as out:
        await asyncio.to_thread(accepting, port)
        pid = out.proc.pid
        started = time.monotonic()
        run = await flood(
            port,
            dsn,
            console,
            1000,
            10,
            10,
            rss_kib=lambda: memory_kib(pid)["VmRSS"],
            more_rounds=100,
        )
        seconds = time.monotonic() - started
        peak = memory_kib(pid)["VmHWM"]
        await asyncio.to_thread(hears_after_listen, dsn, pg.dsn(), "after_slow_full")
        in_use = await asyncio.to_thread(servers_in_use, console)
        assert in_use == 0, f"{in_use} servers still in use"
    # Bounded: what the proxy held for the 20 slow clients, at most notify_buffer_size (+ one
    # read) each, shows; the amount sent (GiBs to the fleet, most of it after the cut) does not.
    first, at_cut, last = (run.rss_kib[i] for i in (0, run.cut_after - 1, -1))
    bound = first + 20 * (BUFFER + READ_CHUNK) // 1024 + 64 * 1024
    with capsys.disabled():
        print(
            f"\n[slow consumers] 1000 fast + 10 stuck + 10 slow listeners, {run.rounds} rounds "
            f"of {PER_ROUND * len(CHANNELS)} notifications of ~1 KB ({run.sent * PAD / 2**20:.0f} "
            f"MiB to each fast listener, {run.sent * PAD * 1000 / 2**30:.1f} GiB in all) in "
            f"{seconds:.1f} s; all slow ones cut off after round {run.cut_after}; every fast "
            f"listener had each round in full (worst delay from commit {run.max_lag:.2f} s); "
            f"pgproxy RSS after round 1 {first / 1024:.1f} MiB, "
            f"at the cut {at_cut / 1024:.1f} MiB, after the last round {last / 1024:.1f} MiB, peak "
            f"{peak / 1024:.1f} MiB (bound checked: {bound / 1024:.0f} MiB)"
        )
    assert peak <= bound, (peak, bound)
    assert last <= at_cut + 16 * 1024, "the proxy's memory grew with what it sent"
