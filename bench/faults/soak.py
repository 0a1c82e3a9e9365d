"""The notification soak (``tests/test_soak.py``'s, against pgproxy as a process): 10
publishers through the proxy send sequenced notifications (transactions of 1 to 200) on
shared channels to 1,000 raw-protocol listeners. Expected: every listener that stays connected
has each publisher's notifications exactly once and in order, any other was told (an error or
a reset), pgproxy's memory stays flat, and afterwards a new LISTEN hears a NOTIFY and no server
is in use. PgBouncer 1.18 is not run: it does not support LISTEN in transaction mode."""

from __future__ import annotations

import asyncio

from bench.faults.env import Env, Finding, progress
from tests.support.load import hears_after_listen
from tests.support.process import memory_kib
from tests.test_soak import SoakRun, check_soak, run_notification_soak

TITLE = "Notification soak"


def run(env: Env) -> list[Finding]:
    publishers, listeners, total = (10, 100, 5000) if env.quick else (10, 1000, 100_000)
    proxy = env.pgproxy({"max_client_conn": listeners + publishers + 20})
    pid = proxy.proc.pid
    title = f"Soak: {publishers} publishers x {listeners:,} listeners x {total:,} notifications"
    bouncer = "not run: LISTEN is unsupported in transaction mode"
    progress(f"[soak] {title} ...")
    idle = memory_kib(pid)["VmRSS"]

    async def soak() -> tuple[SoakRun, int]:
        done = await run_notification_soak(
            proxy.port, proxy.dsn(), publishers, listeners, total, limit=1500
        )
        try:
            return done, len(check_soak(done))
        finally:
            for lst in done.listeners:
                lst.close()

    try:
        done, cut = asyncio.run(soak())
        hears_after_listen(proxy.dsn(), env.cluster.dsn(), "after_datasheet_soak")
    except AssertionError as exc:
        return [Finding(title, f"failed: {exc}", bouncer, ok=False)]
    peak = memory_kib(pid)["VmHWM"]
    in_use = proxy.active_servers()
    deliveries = sum(lst.notifications for lst in done.listeners)
    said = (
        f"{deliveries:,} deliveries in {done.seconds:.0f} s ({total / done.seconds:,.0f} "
        f"notifications/s published), each publisher's exactly once and in order at every "
        f"listener; {cut} cut off (each told); worst delay from commit "
        f"{done.fleet.max_lag * 1000:.0f} ms; RSS {idle / 1024:.0f} MiB idle, peak "
        f"{peak / 1024:.0f}; "
        f"a new LISTEN heard a NOTIFY; {in_use} servers left in use"
    )
    return [Finding(title, said, bouncer, ok=not in_use)]
