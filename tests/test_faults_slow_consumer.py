"""A slow consumer beside hundreds of fast listeners (issue 16).

One client LISTENs and then never reads its socket, another reads one small chunk every 50 ms,
and 200 raw-protocol listeners (``tests/support/fleet.py``) LISTEN on the same channels while
two publishers flood them through the proxy. Seen from outside: every fast listener keeps
getting each publisher's notifications exactly once and in order while the stuck client is
still connected (the proxy holds its backlog, bounded by ``notify_buffer_size``, and never
waits for it); both slow clients are then disconnected by a reset after a correct prefix of
the stream (README "Slow consumers"), counted in ``pgproxy_slow_consumer_disconnects_total``;
and afterwards a new listener hears notifications and no server stays taken.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.fleet import Fleet, Listener, open_fleet, open_listener, publish_sql
from tests.support.load import hears_after_listen, no_server_stays_taken
from tests.support.proxy_runner import ProxyThread
from tests.test_metrics_truth import sample
from tests.test_ops_http import _families, metrics_port

CHANNELS = ("flood_a", "flood_b")
BUFFER = 64 * 1024  # notify_buffer_size: small, so a few rounds overflow it
READ_CHUNK = 256 * 1024  # the most one upstream read hands a client at once
PER_ROUND, PAD = 100, 1000  # notifications per publisher per round, padding bytes each


def _backlogs(proxy: ProxyThread) -> dict[tuple[str, int], int]:
    """Bytes the proxy holds for each logged-in client (written, not yet taken by its socket),
    by the client's address."""

    def read(p: Any) -> dict[tuple[str, int], int]:
        return {
            c.transport.get_extra_info("peername"): c.transport.get_write_buffer_size()
            for c in p.clients.values()
            if c.transport is not None and not c.transport.is_closing()
        }

    return dict(proxy.call(read))


def _slow_consumers(proxy: ProxyThread) -> int:
    return int(proxy.call(lambda p: sum(lst.slow_consumers for lst in p.listeners.values())))


async def _all_have(fleet: Fleet, listeners: list[Listener], total: int) -> None:
    """Until the stream holds ``total`` notifications and every listener has all of them.
    (Polled: the state is spread over 200 protocol objects.)"""
    deadline = time.monotonic() + 30
    while not (
        sum(fleet.log.next_seq.values()) >= total
        and all(lst.offset == len(fleet.log.data) for lst in listeners)
    ):
        stopped = [lst.ended for lst in listeners if lst.ended]
        assert not stopped, f"a fast listener stopped: {stopped[0]}"
        assert time.monotonic() < deadline, "the fast listeners stopped getting notifications"
        await asyncio.sleep(0.02)


async def test_slow_consumers_are_cut_off_and_the_fast_ones_get_everything(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    proxy = make_proxy(proxy={"notify_buffer_size": BUFFER, "metrics_listen": "127.0.0.1:0"})
    fleet = Fleet()
    stuck = await open_listener(fleet, proxy.port, CHANNELS, rcvbuf=4096, stuck=True)
    slow = await open_listener(fleet, proxy.port, CHANNELS, rcvbuf=4096, slow=0.05)
    fast = await open_fleet(fleet, proxy.port, CHANNELS, 200)
    stuck_addr = stuck.transport.get_extra_info("sockname")  # type: ignore[union-attr]
    most_held = 0  # the most the proxy held for any one client
    fast_while_stuck_held = 0  # rounds every fast listener had in full, the stuck one backlogged
    publishers = [
        await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) for _ in CHANNELS
    ]
    sent = 0
    try:
        for round_ in range(100):
            await asyncio.gather(
                *(
                    conn.execute(publish_sql(p, CHANNELS[p], round_ * PER_ROUND, PER_ROUND, PAD))
                    for p, conn in enumerate(publishers)
                )
            )
            sent += PER_ROUND * len(publishers)
            await _all_have(fleet, fast, sent)  # never waiting for the slow ones
            backlogs = await asyncio.to_thread(_backlogs, proxy)
            most_held = max(most_held, *backlogs.values())
            if backlogs.get(stuck_addr, 0) > 0:
                fast_while_stuck_held += 1
            if await asyncio.to_thread(_slow_consumers, proxy) == 2:
                break
        else:
            raise AssertionError("the slow consumers were never cut off")
    finally:
        for conn in publishers:
            await conn.close()

    # Fast listeners got it all, each publisher's notifications once and in order, while the
    # proxy held a backlog for the stuck client, never more than the setting (plus the one
    # upstream read that overflowed an empty buffer) for anyone.
    assert fleet.log.problems == []
    assert fleet.log.next_seq == {"0": sent // 2, "1": sent // 2}
    assert all(lst.ended is None and lst.wrong is None for lst in fast)
    assert fast_while_stuck_held > 0, "the stuck client never had a backlog in the proxy"
    assert most_held <= BUFFER + READ_CHUNK, most_held

    # The slow ones were reset, after a correct prefix of the stream, not left in silence.
    stuck.transport.resume_reading()  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(stuck.closed, slow.closed), 30)
    for lst in (stuck, slow):
        assert lst.wrong is None, lst.wrong
        assert lst.ended is not None and lst.ended.startswith("connection lost"), lst.ended
        assert lst.notifications < sent
    families = await asyncio.to_thread(_families, metrics_port(proxy))
    db = {"database": "postgres"}
    assert sample(families, "pgproxy_slow_consumer_disconnects", "_total", **db) == 2
    assert sample(families, "pgproxy_notifications_dropped", "_total", **db) > 0

    # Healthy afterwards: a new listener is served, nothing stays taken.
    for lst in fast:
        lst.close()
    await asyncio.to_thread(hears_after_listen, proxy.dsn(), pg.dsn(), "after_slow")
    await asyncio.to_thread(no_server_stays_taken, proxy)
