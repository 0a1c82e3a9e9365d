"""Slow consumers beside a thousand fast listeners (``tests/test_faults_slow_consumer.py``'s
flood, against pgproxy as a process): clients that never read and clients that read 4 KiB
every 50 ms LISTEN beside the fleet while two publishers send rounds of 1 KB notifications.
Expected: every fast listener has every round in full, each publisher's notifications once
and in order; every slow client is reset after a correct prefix of the stream; pgproxy's
memory stays bounded (``notify_buffer_size`` per slow client at most) and flat however much is
sent. PgBouncer 1.18 is not run: it does not support LISTEN in transaction mode."""

from __future__ import annotations

import asyncio

from bench.faults.env import Env, Finding, progress
from tests.support.process import memory_kib
from tests.test_faults_slow_consumer import BUFFER, CHANNELS, PAD, PER_ROUND, flood

TITLE = "Slow consumers beside fast listeners"


def run(env: Env) -> list[Finding]:
    fast, stuck, slow, more = (200, 1, 1, 5) if env.quick else (1000, 10, 10, 100)
    proxy = env.pgproxy({"notify_buffer_size": BUFFER, "max_client_conn": fast + 50})
    pid = proxy.proc.pid
    progress(f"[slow_consumer] {fast} fast listeners, {stuck} stuck and {slow} slow clients ...")
    title = f"Slow consumers ({stuck} never reading, {slow} reading slowly) beside {fast} listeners"
    bouncer = "not run: LISTEN is unsupported in transaction mode"
    try:
        done = asyncio.run(
            flood(
                proxy.port,
                proxy.dsn(),
                proxy.dsn("pgbouncer"),
                fast,
                stuck,
                slow,
                rss_kib=lambda: memory_kib(pid)["VmRSS"],
                more_rounds=more,
            )
        )
    except AssertionError as exc:
        return [Finding(title, f"failed: {exc}", bouncer, ok=False)]
    peak = memory_kib(pid)["VmHWM"]
    first, at_cut, last = (done.rss_kib[i] for i in (0, done.cut_after - 1, -1))
    in_use = proxy.active_servers()
    said = (
        f"every fast listener had each of {done.rounds} rounds ({PER_ROUND * len(CHANNELS)} "
        f"notifications of {PAD} B, {done.sent * PAD * fast / 2**30:.1f} GiB in all) in full, "
        f"once and in order (worst delay {done.max_lag:.2f} s); all {stuck + slow} slow "
        f"clients were reset after round {done.cut_after}, each after a correct prefix; RSS "
        f"{first / 1024:.0f} MiB after round 1, {at_cut / 1024:.0f} at the cut, "
        f"{last / 1024:.0f} at the end (peak {peak / 1024:.0f}); {in_use} servers left in use"
    )
    bounded = peak <= first + (stuck + slow) * 2 * BUFFER // 1024 + 64 * 1024
    return [Finding(title, said, bouncer, ok=bounded and last <= at_cut + 16 * 1024 and not in_use)]
