"""Postgres restarted (fast, then immediate) while clients run ``select 1`` through both
poolers at once: how long after Postgres accepts connections again each pooler serves, and
what its clients saw meanwhile (PgBouncer: ``server_login_retry``, 15 s by default). Through
pgproxy, 500 clients LISTEN meanwhile: each must be told its listener was lost (none left
waiting in silence), and a new LISTEN must hear notifications once Postgres is back."""

from __future__ import annotations

import time

from bench.faults.env import Env, Finding, progress
from bench.faults.load import Loops, describe, hears_again, listening, told_of_loss

TITLE = "Postgres restarted under load"
LONGEST = 40.0  # seconds to wait for a pooler to serve again


def run(env: Env) -> list[Finding]:
    proxy = env.pgproxy({"default_pool_size": 4})
    bouncer = env.pgbouncer({"default_pool_size": 4})
    count = 20 if env.quick else 500
    findings = []
    for mode in ("fast", "immediate"):
        progress(f"[restart {mode}] {count} listeners through pgproxy ...")
        listeners = listening(proxy.dsn(), count, "datasheet_restart")
        with Loops(proxy.dsn()) as on_proxy, Loops(bouncer.dsn()) as on_bouncer:
            time.sleep(1.0)
            down = time.monotonic()
            env.cluster.restart(mode)
            up = time.monotonic()
            deadline = up + LONGEST
            while time.monotonic() < deadline and not (
                on_proxy.first_ok_after(up) and on_bouncer.first_ok_after(up)
            ):
                time.sleep(0.05)
            time.sleep(1.0)
        told, silent = told_of_loss(listeners)
        heard = hears_again(proxy.dsn(), env.cluster.dsn(), "datasheet_restart") is not None
        seen = {}
        for name, loops in (("pgproxy", on_proxy), ("pgbouncer", on_bouncer)):
            back = loops.first_ok_after(up)
            when = (
                f"served again {back - up:.2f} s" if back else f"not served within {LONGEST:.0f} s"
            )
            meanwhile = describe(loops.errors(down))
            seen[name] = (back, f"{when} after Postgres was back; meanwhile {meanwhile}")
        proxy_back = seen["pgproxy"][0]
        heard_text = (
            f"; {told} of {count} listeners told their listener was lost, {silent} left silent;"
            f" a new LISTEN {'heard a NOTIFY' if heard else 'heard nothing'}"
        )
        findings.append(
            Finding(
                f"Postgres restarted ({mode}) under load, {count} listeners",
                seen["pgproxy"][1] + heard_text,
                seen["pgbouncer"][1] + " (no listeners: LISTEN is unsupported in transaction mode)",
                ok=proxy_back is not None
                and proxy_back - up < 5.0
                and (told, silent) == (count, 0)
                and heard,
            )
        )
    return findings
