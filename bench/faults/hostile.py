"""2,000 hostile connections at once against each pooler in session mode (the kinds of
tests/test_faults_hostile.py: garbage, bad and huge lengths, truncated and flooded startups,
SSL/GSS confusion, silence, bad, huge and half messages after login). Afterwards: servers the
pooler still holds as in use with no client left, 5 s after and (if any) 30 s after (stuck for
good), and whether a real client is served."""

from __future__ import annotations

import asyncio
import time

import psycopg

from bench.faults.env import Env, Finding, Target, progress
from tests.test_faults_hostile import HOSTILE, _hostile

TITLE = "Hostile connections"
SETTLE = 5.0  # seconds after the last hostile connection closed
FOR_GOOD = 30.0  # ... and if some were still in use then: stuck for good if still in use now


async def _attack(targets: list[Target], per_kind: int) -> None:
    await asyncio.gather(
        *(_hostile(t.port, p) for t in targets for p in HOSTILE.values() for _ in range(per_kind))
    )


def _after(target: Target) -> tuple[int, str]:
    stuck = target.active_servers()
    try:
        with psycopg.connect(target.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute("select 1")
        served = "a new client is served"
    except psycopg.Error as exc:
        served = f"a new client fails: {exc}".splitlines()[0]
    return stuck, served


def run(env: Env) -> list[Finding]:
    per_kind = 10 if env.quick else 2000 // len(HOSTILE) + 1
    total = per_kind * len(HOSTILE)
    settings = {"pool_mode": "session", "default_pool_size": 20}
    proxy = env.pgproxy({**settings, "client_login_timeout": 5})
    bouncer = env.pgbouncer({**settings, "client_login_timeout": 5})
    for target in (proxy, bouncer):  # a pool and its servers exist before the attack
        with psycopg.connect(target.dsn(), autocommit=True) as conn:
            conn.execute("select 1")
    progress(f"[hostile] {total} connections to each ...")
    started = time.monotonic()
    asyncio.run(_attack([proxy, bouncer], per_kind))
    took = time.monotonic() - started
    time.sleep(SETTLE)
    early = {t.name: t.active_servers() for t in (proxy, bouncer)}
    if any(early.values()):  # in use a while after: back later, or stuck for good?
        time.sleep(FOR_GOOD - SETTLE)
    said, stuck_proxy = {}, 0
    for target in (proxy, bouncer):
        stuck, served = _after(target)
        if target is proxy:
            stuck_proxy = stuck
        later = f", {stuck} after {FOR_GOOD:.0f} s" if any(early.values()) else ""
        said[target.name] = (
            f"{early[target.name]} servers in use {SETTLE:.0f} s after the last of {total} "
            f"hostile connections closed ({took:.0f} s){later}; {served}"
        )
    title = f"{total} hostile connections (session mode)"
    ok = stuck_proxy == 0 and "served" in said["pgproxy"]
    return [Finding(title, said["pgproxy"], said["pgbouncer"], ok)]
