"""5,000 SCRAM logins, 1,000 handshakes in flight, beside a steady client already logged in
(``bench/storm.py``, one round): the steady client's latency, and how the logins beyond
``max_client_conn`` were refused."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop

from bench import storm
from bench.faults.env import Env, Finding, progress

TITLE = "Connection storm"


def _said(row: storm.Row, refused_as: str) -> str:
    refused = sum(n for what, n in row.outcomes.items() if what != "ok")
    how = ", ".join(f"{n} x {what}" for what, n in sorted(row.outcomes.items()) if what != "ok")
    return (
        f"steady client p99 {row.q('during', 0.99) * 1000:.0f} ms, worst "
        f"{max(row.during) * 1000:.0f} ms (before the storm: p99 "
        f"{row.q('baseline', 0.99) * 1000:.0f} ms); {refused} logins refused ({how or 'none'}); "
        f"pooler CPU {row.cpu_s * 1000 / sum(row.outcomes.values()):.2f} ms per login"
    )


def run(env: Env) -> list[Finding]:
    args = storm.parse_args(["--quick"] if env.quick else [])
    progress(f"[storm] {args.logins} logins ...")
    with contextlib.suppress(Exception):
        env.cluster.psql(f"create role {storm.USER} login")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rows = runner.run(storm.run_all(args, env.cluster, env.tmp))
    by = {r.target: r for r in rows}
    proxy, bouncer = by["pgproxy"], by["pgbouncer"]
    title = f"Connection storm: {args.logins} logins, {args.in_flight} in flight"
    ok = set(proxy.outcomes) <= {"ok", "53300"} and not proxy.steady_errors
    return [Finding(title, _said(proxy, "53300"), _said(bouncer, "08P01"), ok)]
