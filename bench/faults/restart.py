"""Postgres restarted (fast, then immediate) while clients run ``select 1`` through both
poolers at once: how long after Postgres accepts connections again each pooler serves, and
what its clients saw meanwhile (PgBouncer: ``server_login_retry``, 15 s by default). Through
pgproxy, 500 clients LISTEN meanwhile: each must be told its listener was lost (none left
waiting in silence), and a new LISTEN must hear notifications once Postgres is back."""

from __future__ import annotations

import time

import psycopg

from bench.faults.env import Env, Finding, progress
from bench.faults.load import Loops, describe

TITLE = "Postgres restarted under load"
LONGEST = 40.0  # seconds to wait for a pooler to serve again


def run(env: Env) -> list[Finding]:
    proxy = env.pgproxy({"default_pool_size": 4})
    bouncer = env.pgbouncer({"default_pool_size": 4})
    count = 20 if env.quick else 500
    findings = []
    for mode in ("fast", "immediate"):
        progress(f"[restart {mode}] {count} listeners through pgproxy ...")
        listeners = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(count)]
        for conn in listeners:
            conn.execute("LISTEN datasheet_restart")
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
        told, silent = _told(listeners)
        heard = _hears_again(proxy.dsn(), env.cluster.dsn())
        seen = {}
        for name, loops in (("pgproxy", on_proxy), ("pgbouncer", on_bouncer)):
            back = loops.first_ok_after(up)
            when = (
                f"served again {back - up:.2f} s" if back else f"not served within {LONGEST:.0f} s"
            )
            meanwhile = describe(loops.errors(down))
            seen[name] = (back, f"{when} after Postgres was back; meanwhile {meanwhile}")
        proxy_back = seen["pgproxy"][0]
        listening = (
            f"; {told} of {count} listeners told their listener was lost, {silent} left silent;"
            f" a new LISTEN {'heard a NOTIFY' if heard else 'heard nothing'}"
        )
        findings.append(
            Finding(
                f"Postgres restarted ({mode}) under load, {count} listeners",
                seen["pgproxy"][1] + listening,
                seen["pgbouncer"][1] + " (no listeners: LISTEN is unsupported in transaction mode)",
                ok=proxy_back is not None
                and proxy_back - up < 5.0
                and (told, silent) == (count, 0)
                and heard,
            )
        )
    return findings


def _told(listeners: list[psycopg.Connection[tuple[object, ...]]]) -> tuple[int, int]:
    """How many listeners were closed with an error naming the listener, and how many are
    still open as if nothing happened (listener_loss = "disconnect": none may be)."""
    told = silent = 0
    for conn in listeners:
        try:
            conn.execute("select 1")
            silent += 1
        except psycopg.OperationalError as exc:
            told += "listener" in str(exc)
        finally:
            conn.close()
    return told, silent


def _hears_again(proxy_dsn: str, direct_dsn: str) -> bool:
    with psycopg.connect(proxy_dsn, autocommit=True) as again:
        again.execute("LISTEN datasheet_restart")
        with psycopg.connect(direct_dsn, autocommit=True) as direct:
            direct.execute("NOTIFY datasheet_restart, 'back'")
        return [n.payload for n in again.notifies(timeout=10, stop_after=1)] == ["back"]
