"""A black-holed upstream: it accepts TCP and never answers. Three clients arrive at +0, +3
and +6 s; how long each waited and what it was told. pgproxy's bound is
``server_connect_timeout``; PgBouncer (same ``server_connect_timeout``,
``query_wait_timeout = 20``) answers when the client's wait times out."""

from __future__ import annotations

import socket
import threading
import time

import psycopg

from bench.faults.env import Env, Finding, progress
from bench.faults.load import kind

TITLE = "Black-holed upstream"
CONNECT_TIMEOUT = 5
QUERY_WAIT = 20


def _clients(dsn: str, spacing: float, results: list[tuple[float, str]]) -> list[threading.Thread]:
    def one(delay: float) -> None:
        time.sleep(delay)
        started = time.monotonic()
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=90) as conn:
                conn.execute("select 1")
            outcome = "served"
        except psycopg.Error as exc:
            outcome = kind(exc)
        results.append((time.monotonic() - started, outcome))

    return [threading.Thread(target=one, args=(i * spacing,)) for i in range(3)]


def run(env: Env) -> list[Finding]:
    spacing = 1.0 if env.quick else 3.0
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # never accept()ed: the kernel completes handshakes nobody answers
        url = f"127.0.0.1:{hole.getsockname()[1]}"
        proxy = env.pgproxy(
            {"server_connect_timeout": CONNECT_TIMEOUT, "client_login_timeout": 90},
            {"hole": f"postgresql://{url}/postgres"},
        )
        host, port = url.split(":")
        bouncer = env.pgbouncer(
            {"server_connect_timeout": CONNECT_TIMEOUT, "query_wait_timeout": QUERY_WAIT},
            {"hole": f"host={host} port={port} dbname=postgres"},
        )
        progress("[blackhole] 3 clients each ...")
        results: dict[str, list[tuple[float, str]]] = {"pgproxy": [], "pgbouncer": []}
        threads = _clients(proxy.dsn("hole"), spacing, results["pgproxy"])
        threads += _clients(bouncer.dsn("hole"), spacing, results["pgbouncer"])
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def said(rows: list[tuple[float, str]]) -> str:
        waits = ", ".join(f"{w:.1f}" for w, _ in sorted(rows))
        told = sorted({what for _, what in rows})
        arrivals = f"+0, +{spacing:g}, +{2 * spacing:g} s"
        return f"clients arriving at {arrivals} waited {waits} s; told: " + "; ".join(
            f"`{t}`" for t in told
        )

    worst = max(w for w, _ in results["pgproxy"])
    ok = len(results["pgproxy"]) == 3 and worst <= CONNECT_TIMEOUT + 1.0
    title = f"Black-holed upstream (server_connect_timeout {CONNECT_TIMEOUT} s)"
    return [Finding(title, said(results["pgproxy"]), said(results["pgbouncer"]), ok)]
