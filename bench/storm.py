"""A login storm beside a steady client: pgproxy and PgBouncer 1.18 side by side.

Everything runs on this machine: a throwaway cluster, pgproxy and PgBouncer as subprocesses,
both in transaction mode with SCRAM-SHA-256 towards the clients and the same ``max_client_conn``.
Per target and round:

1. a **steady client** (a process of its own, blocking sockets: nothing else runs in it) logs in
   and sends ``SELECT 1`` every ``--interval-ms`` (5) ms, timing each round trip;
2. after ``--baseline`` (1) s, the **storm**: ``--logins`` (5000) raw-socket clients, at most
   ``--in-flight`` (1000) handshakes at a time (connect, startup, SCRAM, up to ReadyForQuery or
   an error); a client that got in stays connected until the storm is over, so logins beyond
   ``--max-client-conn`` (4000) are refused;
3. the steady client's latencies while the storm ran: p50 / p99 / max, beside its baseline;
   the logins' outcomes (ok, each SQLSTATE refused with, other failures).

    .venv/bin/python -m bench.storm --rounds 2

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.throughput import (
    REPO,
    group_cpu,
    machine_line,
    percentile,
    pgbouncer_version,
)
from bench.throughput import start_pgbouncer as start_throughput_pgbouncer
from pgproxy.auth import scram, scram_client
from pgproxy.protocol import messages as m
from pgproxy.testing import servers
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import free_port, raise_nofile, stop_server

USER = "bench"
PASSWORD = "bench-secret"
DB = "postgres"
TARGETS = ("pgproxy", "pgbouncer")
_HEADER = struct.Struct("!ci")
LOGIN_TIMEOUT = 60.0
Server = tuple[subprocess.Popen[bytes], int]  # a pooler's process and port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--logins", type=int, default=5000)
    p.add_argument("--in-flight", type=int, default=1000)
    p.add_argument("--max-client-conn", type=int, default=4000)
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--baseline", type=float, default=1.0, help="seconds before the storm")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--secret",
        choices=("verifier", "plain"),
        default="verifier",
        help="what both poolers store for the user: a SCRAM verifier or the password",
    )
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--profile", type=Path, help="py-spy record pgproxy during each storm into DIR")
    p.add_argument("--quick", action="store_true", help="200 logins, 50 in flight: a smoke run")
    p.add_argument("--out", type=Path)
    p.add_argument("--steady", type=int, help=argparse.SUPPRESS)  # the steady client's port
    args = p.parse_args(argv)
    if args.quick:
        args.logins, args.in_flight, args.max_client_conn, args.baseline = 200, 50, 150, 0.3
    args.targets = [t for t in args.targets.split(",") if t]
    if not set(args.targets) <= set(TARGETS):
        p.error(f"--targets: choose from {', '.join(TARGETS)}")
    return args


# --- the wire, both clients ------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate} {message}")
        self.sqlstate = sqlstate


def _answer(client: scram_client.ScramClient, type_: int, body: bytes) -> bytes | None:
    """The reply to one login message; None when nothing is to be sent. Raises Refused."""
    if type_ == m.ERROR_RESPONSE:
        fields = m.parse_error_fields(body)
        raise Refused(fields.get("C", "?"), fields.get("M", ""))
    if type_ != m.AUTHENTICATION:
        return None
    code, data = m.parse_authentication(body)
    if code == m.AUTH_SASL:
        return m.sasl_initial_response(scram.MECHANISM, client.client_first())
    if code == m.AUTH_SASL_CONTINUE:
        return m.password_message(client.handle_server_first(data))
    if code == m.AUTH_SASL_FINAL:
        client.handle_server_final(data)
    elif code == m.AUTH_OK and not client.finished:
        raise RuntimeError("AuthenticationOk without a verified SCRAM exchange")
    return None


async def storm_login(port: int, held: list[asyncio.StreamWriter]) -> str:
    """One login of the storm: "ok", or the SQLSTATE it was refused with, or why it failed."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(m.startup_message({"user": USER, "database": DB}))
        client = scram_client.ScramClient(PASSWORD)
        while True:
            type_, length = _HEADER.unpack(await reader.readexactly(5))
            body = await reader.readexactly(length - 4)
            if type_[0] == m.READY_FOR_QUERY:
                held.append(writer)
                return "ok"
            reply = _answer(client, type_[0], body)
            if reply is not None:
                writer.write(reply)
    except Refused as exc:
        return exc.sqlstate
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
        return f"connection: {type(exc).__name__}"
    finally:
        if writer is not None and (not held or held[-1] is not writer):
            writer.close()


def _recv_message(sock: socket.socket) -> tuple[int, bytes]:
    head = _recv_exactly(sock, 5)
    type_, length = _HEADER.unpack(head)
    return type_[0], _recv_exactly(sock, length - 4)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def steady_client(port: int, interval: float) -> int:
    """The steady client (``--steady PORT``): log in, say "ready", then ``SELECT 1`` every
    ``interval`` s until stdin says "stop"; print [[send time, latency], ...] as JSON
    (CLOCK_MONOTONIC: the parent's clock too)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(m.startup_message({"user": USER, "database": DB}))
    client = scram_client.ScramClient(PASSWORD)
    while True:
        type_, body = _recv_message(sock)
        if type_ == m.READY_FOR_QUERY:
            break
        reply = _answer(client, type_, body)
        if reply is not None:
            sock.sendall(reply)
    print("ready", flush=True)
    query = m.query("SELECT 1")
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    next_at = time.monotonic()
    while True:
        wait = max(0.0, next_at - time.monotonic())
        if select.select([sys.stdin], [], [], wait)[0]:
            break  # "stop"
        t0 = time.monotonic()
        sock.sendall(query)
        while True:
            type_, body = _recv_message(sock)
            if type_ == m.ERROR_RESPONSE:
                errors.append(repr(m.parse_error_fields(body)))
            if type_ == m.READY_FOR_QUERY:
                break
        samples.append((t0, time.monotonic() - t0))
        next_at = max(next_at + interval, time.monotonic())  # no catch-up burst after a stall
    sock.close()
    print(json.dumps({"samples": samples, "errors": errors}), flush=True)
    return 0


# --- the targets -----------------------------------------------------------------------------


def stored_secret(kind: str) -> str:
    return PASSWORD if kind == "plain" else str(scram.ScramVerifier.from_password(PASSWORD))


def start_pgproxy(
    tmp: Path, pg_port: int, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = tmp / "pgproxy-storm.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f"default_pool_size = 20\nmax_client_conn = {args.max_client_conn}\n"
        f'auth_type = "scram-sha-256"\nlog_level = "warning"\n'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
        f'\n[users.{USER}]\npassword = "{stored_secret(args.secret)}"\n'
    )
    cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
    return servers.start_server("pgproxy", cmd, port, tmp / "pgproxy.log", REPO), port


def start_pgbouncer(
    tmp: Path, pg_port: int, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], int]:
    """bench.throughput's, with SCRAM towards the clients (PgBouncer logs in upstream with
    trust)."""
    settings = {
        "auth_type": "scram-sha-256",
        "default_pool_size": 20,
        "max_client_conn": args.max_client_conn,
    }
    users = f'"{USER}" "{stored_secret(args.secret)}"\n'
    return start_throughput_pgbouncer(tmp, pg_port, settings, users)


# --- one storm -------------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    round: int
    baseline: list[float]  # the steady client's latencies before the storm (s)
    during: list[float]  # ... while the storm ran
    outcomes: Counter[str]
    storm_s: float
    cpu_s: float  # the pooler's CPU time (user + system) during the storm
    steady_errors: list[str] = field(default_factory=list)

    def q(self, which: str, qq: float) -> float:
        values = sorted(self.baseline if which == "baseline" else self.during)
        return percentile(values, qq) if values else float("nan")


async def run_storm(target: str, rnd: int, port: int, pid: int, args: argparse.Namespace) -> Row:
    steady = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.storm", "--steady", str(port),
        "--interval-ms", str(args.interval_ms), cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert steady.stdout is not None and steady.stdin is not None
    if (await steady.stdout.readline()).strip() != b"ready":
        raise RuntimeError(f"the steady client could not log in to {target}")
    await asyncio.sleep(args.baseline)
    spy = None
    if args.profile is not None and target == "pgproxy":
        args.profile.mkdir(parents=True, exist_ok=True)
        out = args.profile / f"storm-{rnd}.speedscope.json"
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spy = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(pid), "--format", "speedscope", "-o", str(out),
            "--rate", "250", "--nonblocking",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # py-spy attaches
    print(f"[{target} round {rnd}] storm of {args.logins} ...", file=sys.stderr)
    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(args.in_flight)

    async def one() -> str:
        async with gate:
            try:
                async with asyncio.timeout(LOGIN_TIMEOUT):
                    return await storm_login(port, held)
            except TimeoutError:
                return "no answer in 60 s"

    cpu0 = group_cpu(pid)
    start = time.monotonic()
    outcomes = Counter(await asyncio.gather(*(one() for _ in range(args.logins))))
    end = time.monotonic()
    cpu = group_cpu(pid) - cpu0
    await asyncio.sleep(0.2)
    steady.stdin.write(b"stop\n")
    await steady.stdin.drain()
    result = json.loads(await steady.stdout.read())
    await steady.wait()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        await asyncio.wait_for(spy.wait(), 30)
    for writer in held:
        with contextlib.suppress(Exception):
            writer.write(m.message(m.TERMINATE))
            writer.close()
    await asyncio.gather(*(w.wait_closed() for w in held), return_exceptions=True)
    samples = result["samples"]
    before = [lat for t, lat in samples if t < start]
    during = [lat for t, lat in samples if start <= t <= end]
    return Row(target, rnd, before, during, outcomes, end - start, cpu, result["errors"])


# --- the report ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(rows: list[Row], args: argparse.Namespace, machine: str) -> str:
    lines = [
        "# Login storm beside a steady client",
        "",
        f"{args.logins} SCRAM logins, at most {args.in_flight} handshakes in flight, "
        f"max_client_conn {args.max_client_conn}, the user stored as a {args.secret}; a steady "
        f"client already logged in runs `SELECT 1` every {args.interval_ms:g} ms.",
        "",
        "| target | round | steady p50 ms | steady p99 ms | steady max ms | baseline p99 ms "
        "| samples | storm s | logins/s | pooler CPU ms/login | outcomes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r.outcomes.items()))
        lines.append(
            f"| {r.target} | {r.round} | {ms(r.q('during', 0.5))} | {ms(r.q('during', 0.99))} "
            f"| {ms(max(r.during, default=float('nan')))} | {ms(r.q('baseline', 0.99))} "
            f"| {len(r.during)} | {r.storm_s:.2f} | {args.logins / r.storm_s:.0f} "
            f"| {r.cpu_s * 1000 / args.logins:.2f} | {outcomes} |"
        )
    by = {t: [r for r in rows if r.target == t] for t in TARGETS}
    if by["pgproxy"] and by["pgbouncer"]:
        worst = {t: max(max(r.during, default=0.0) for r in by[t]) for t in TARGETS}
        p99 = {t: max(r.q("during", 0.99) for r in by[t]) for t in TARGETS}
        lines += [
            "",
            f"Worst over the rounds: steady p99 pgproxy {ms(p99['pgproxy'])} ms vs PgBouncer "
            f"{ms(p99['pgbouncer'])} ms ({p99['pgproxy'] / p99['pgbouncer']:.2f}x); max "
            f"{ms(worst['pgproxy'])} ms vs {ms(worst['pgbouncer'])} ms "
            f"({worst['pgproxy'] / worst['pgbouncer']:.2f}x).",
        ]
    failures = [
        f"{r.target} round {r.round}: steady client got {e}" for r in rows for e in r.steady_errors
    ]
    failures += [
        f"pgproxy round {r.round}: {n} logins ended with {k}"
        for r in rows if r.target == "pgproxy"
        for k, n in r.outcomes.items() if k not in ("ok", "53300")
    ]  # fmt: skip
    lines += ["", *(f"FAILED: {f}" for f in failures)] if failures else ["", "checks: OK"]
    lines += ["", f"machine: {machine}", ""]
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, cluster: PgCluster, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    procs: dict[str, Server] = {}
    try:
        for target in args.targets:
            start = start_pgproxy if target == "pgproxy" else start_pgbouncer
            procs[target] = start(tmp, cluster.port, args)
        for rnd in range(1, args.rounds + 1):
            order = args.targets if rnd % 2 else args.targets[::-1]
            for target in order:
                proc, port = procs[target]
                rows.append(await run_storm(target, rnd, port, proc.pid, args))
                await asyncio.sleep(1.0)  # the held clients' logouts settle
    finally:
        for proc, _ in procs.values():
            stop_server(proc)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steady is not None:
        return steady_client(args.steady, args.interval_ms / 1000)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-storm-"))
    cluster = PgCluster(settings={"max_connections": 100})
    try:
        cluster.start()
        cluster.psql(f"create role {USER} login")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            rows = runner.run(run_all(args, cluster, tmp))
        machine = machine_line(cluster.bindir, pgbouncer_version())
        text = report(rows, args, machine)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0 if "checks: OK" in text else 1
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
