"""pgproxy memory per idle client, and a SCRAM login storm.

Everything runs on this machine: a throwaway cluster, pgproxy as a subprocess (transaction
mode, ``auth_type = "scram-sha-256"``), and a minimal raw-socket client built from pgproxy's
own message builders (``pgproxy.protocol.messages``) and SCRAM client
(``pgproxy.auth.scram_client.ScramClient``): thousands of psycopg connections would cost more than
the proxy being measured.

* **RSS per idle client**: for each ``--clients`` value and each ``--kinds`` (``idle``: logged
  in, no transaction; ``listen``: also ``LISTEN`` on one shared channel; ``listen-own``: a
  channel of its own each), a fresh pgproxy, (VmRSS with N clients - VmRSS with 0) / N.
* **Login storm**: ``--storm`` clients start the startup + SCRAM handshake at the same moment
  against a freshly started pgproxy, once per secret kind (``trust`` as the baseline, a
  ``SCRAM-SHA-256$`` verifier, a plain password); total time, p50/p99/max login time,
  pgproxy's CPU per login, and the cost of one PBKDF2 (4096 iterations) measured here.

    .venv/bin/python -m bench.memory --clients 1000,10000 --storm 2000

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import linecache
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench._instrumented_pgproxy import COUNT_SIGNAL, TRACE_SIGNAL
from bench.fanout import cpu_s, psycopg_version, rss_kb
from bench.throughput import machine_line, percentile, start_server
from pgproxy.auth import scram, scram_client, scram_server
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import free_port, raise_nofile, stop_server

REPO = Path(__file__).resolve().parent.parent
USER = "bench"
PASSWORD = "bench-secret"
DB = "postgres"
CHANNEL = "idle"
KINDS = ("idle", "listen", "listen-own")
SECRETS = ("trust", "verifier", "plain", "plain-warm")
TARGET_KIB = 20
_HEADER = struct.Struct("!ci")
OK_LINE = "memory: every client logged in"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(c) for c in text.split(",") if c.strip()]

    def names(allowed: tuple[str, ...]) -> argparse._ActionType:
        def parse(text: str) -> list[str]:
            out = [c.strip() for c in text.split(",") if c.strip()]
            bad = [c for c in out if c not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {allowed}")
            return out

        return parse

    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=ints, default=[1000, 10000], help="idle clients (list)")
    p.add_argument(
        "--kinds", type=names(KINDS), default=list(KINDS[:2]), help=f"client kinds, of {KINDS}"
    )
    p.add_argument("--storm", type=int, default=2000, help="simultaneous logins (0 = skip)")
    p.add_argument(
        "--secrets", type=names(SECRETS), default=list(SECRETS), help=f"storm rows, of {SECRETS}"
    )
    p.add_argument("--concurrency", type=int, default=200, help="logins at a time (memory rows)")
    p.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="N",
        help="also run pgproxy under tracemalloc with N idle clients and show what holds memory",
    )
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.storm, args.trace = [50], 50, 50
    if any(n < 1 for n in args.clients) or args.storm < 0 or args.concurrency < 1:
        p.error("counts must be positive")
    return args


# --- a minimal client ------------------------------------------------------------------------


class LoginError(RuntimeError):
    pass


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    login_s: float


async def read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(5)
    type_, length = _HEADER.unpack(head)
    return type_[0], await reader.readexactly(length - 4)


async def until_ready(reader: asyncio.StreamReader) -> None:
    """Read up to ReadyForQuery; an ErrorResponse on the way is a failure."""
    while True:
        type_, body = await read_message(reader)
        if type_ == m.ERROR_RESPONSE:
            fields = m.parse_error_fields(body)
            raise LoginError(f"{fields.get('C')} {fields.get('M')}")
        if type_ == m.READY_FOR_QUERY:
            return


async def login(port: int, password: str | None, listen: str | None = None) -> Client:
    """Startup, SCRAM (when asked for), wait for ReadyForQuery; then ``LISTEN`` if asked.

    Login time runs from before the TCP connect to the ReadyForQuery."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(m.startup_message({"user": USER, "database": DB}))
        client = scram_client.ScramClient(password or "")
        while True:
            type_, body = await read_message(reader)
            if type_ == m.AUTHENTICATION:
                code, data = m.parse_authentication(body)
                if code == m.AUTH_SASL:
                    first = client.client_first()
                    writer.write(m.sasl_initial_response(scram.MECHANISM, first))
                elif code == m.AUTH_SASL_CONTINUE:
                    writer.write(m.password_message(client.handle_server_first(data)))
                elif code == m.AUTH_SASL_FINAL:
                    client.handle_server_final(data)
                elif code == m.AUTH_OK:
                    if password is not None and not client.finished:
                        raise LoginError("AuthenticationOk without a verified SCRAM exchange")
                else:
                    raise LoginError(f"unexpected authentication request {code}")
            elif type_ == m.ERROR_RESPONSE:
                fields = m.parse_error_fields(body)
                raise LoginError(f"{fields.get('C')} {fields.get('M')}")
            elif type_ == m.READY_FOR_QUERY:
                break
        login_s = time.perf_counter() - t0
        if listen is not None:
            writer.write(m.query(f"LISTEN {listen}"))
            await until_ready(reader)
    except BaseException:
        writer.close()
        raise
    return Client(reader, writer, login_s)


async def close_all(clients: list[Client]) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            c.writer.write(m.message(m.TERMINATE))
            c.writer.close()
    await asyncio.gather(*(c.writer.wait_closed() for c in clients), return_exceptions=True)


async def connect_many(
    port: int, password: str | None, n: int, concurrency: int, kind: str
) -> tuple[list[Client], list[BaseException]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Client:
        channel = {"idle": None, "listen": CHANNEL, "listen-own": f"c{i}"}[kind]
        async with sem:
            return await login(port, password, channel)

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    return (
        [r for r in results if isinstance(r, Client)],
        [r for r in results if isinstance(r, BaseException)],
    )


# --- pgproxy ---------------------------------------------------------------------------------


def start_pgproxy(
    tmp: Path, pg_port: int, secret: str, max_clients: int, traced: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """pgproxy with user ``bench`` whose password is stored as ``secret`` ("trust": none),
    run through bench/_instrumented_pgproxy.py (PBKDF2 counter; tracemalloc if ``traced``)."""
    port = free_port()
    config = tmp / "pgproxy-memory.toml"
    auth = "trust" if secret == "trust" else "scram-sha-256"
    stored = PASSWORD if secret == "plain" else str(scram.ScramVerifier.from_password(PASSWORD))
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f"default_pool_size = 5\nmax_client_conn = {max_clients}\n"
        f'auth_type = "{auth}"\nlog_level = "warning"\n'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
        f'\n[users.{USER}]\npassword = "{stored}"\n'
    )
    for old in tmp.glob("*-[0-9]*"):  # probe files of an earlier row
        old.unlink()
    # RLIMIT_NOFILE is inherited: raise_nofile() already ran in this process.
    cmd = [sys.executable, "-m", "bench._instrumented_pgproxy", "--config", str(config)]
    # start_server passes our environment on (bench.throughput.clean_env).
    os.environ["BENCH_TRACEMALLOC"] = "1" if traced else "0"
    try:
        return start_server("pgproxy", cmd, port, tmp / "pgproxy.log"), port
    finally:
        del os.environ["BENCH_TRACEMALLOC"]


def password_for(secret: str) -> str | None:
    return None if secret == "trust" else PASSWORD


# --- measurements ----------------------------------------------------------------------------


@dataclass
class MemRow:
    kind: str
    clients: int
    rss_before: int  # kB
    rss_after: int
    connect_s: float
    failures: list[str] = field(default_factory=list)

    @property
    def per_client_kib(self) -> float:
        return (self.rss_after - self.rss_before) / self.clients


@dataclass
class StormRow:
    secret: str
    clients: int
    total_s: float
    logins: list[float]
    proxy_cpu: tuple[float, float]
    pbkdf2: int  # PBKDF2 derivations pgproxy ran during the storm
    failures: list[str] = field(default_factory=list)


async def settle() -> None:
    """Let pgproxy finish what the last replies set off (log, timers) before sampling RSS."""
    await asyncio.sleep(1.0)


async def measure_memory(
    tmp: Path, cluster: PgCluster, kind: str, n: int, args: argparse.Namespace
) -> MemRow:
    proc, port = start_pgproxy(tmp, cluster.port, "verifier", n + 100)
    try:
        # Warm-up: the first login creates the pool (one upstream connection learns the
        # server's parameters), the first LISTEN starts the upstream listener.
        warm = await login(port, PASSWORD, "warm" if kind != "idle" else None)
        await close_all([warm])
        await settle()
        before = rss_kb(proc.pid)
        print(f"[memory {kind} n={n}] connecting ...", file=sys.stderr)
        t0 = time.perf_counter()
        clients, errors = await connect_many(port, PASSWORD, n, args.concurrency, kind)
        connect_s = time.perf_counter() - t0
        try:
            await settle()
            after = rss_kb(proc.pid)
        finally:
            await close_all(clients)
        row = MemRow(kind, n, before, after, connect_s, [repr(e) for e in errors[:3]])
        if errors:
            row.failures.insert(0, f"{len(errors)} of {n} logins failed")
        return row
    finally:
        stop_server(proc)


async def measure_storm(tmp: Path, cluster: PgCluster, secret: str, n: int) -> StormRow:
    """``n`` logins started at once against a pgproxy that has never seen a login (its
    pool, and for a plain password its verifier cache, are cold: a restart's storm), except
    for ``plain-warm``, where one login went first."""
    stored = "plain" if secret.startswith("plain") else secret
    proc, port = start_pgproxy(tmp, cluster.port, stored, n + 100)
    password = password_for(stored)
    try:
        if secret == "plain-warm":  # one login first: pool and plain-password cache warm
            await close_all([await login(port, password)])
        print(f"[storm {secret} n={n}] ...", file=sys.stderr)
        derived0 = await pbkdf2_count(proc.pid, tmp, 0)
        cpu0 = cpu_s(proc.pid)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(login(port, password) for _ in range(n)), return_exceptions=True
        )
        total = time.perf_counter() - t0
        cpu = cpu_s(proc.pid)
        clients = [r for r in results if isinstance(r, Client)]
        errors = [r for r in results if isinstance(r, BaseException)]
        derived = await pbkdf2_count(proc.pid, tmp, 1) - derived0
        await close_all(clients)
        row = StormRow(
            secret, n, total, sorted(c.login_s for c in clients),
            (cpu[0] - cpu0[0], cpu[1] - cpu0[1]), derived, [repr(e) for e in errors[:3]],
        )  # fmt: skip
        if errors:
            row.failures.insert(0, f"{len(errors)} of {n} logins failed")
        return row
    finally:
        stop_server(proc)


def pbkdf2_ms(iterations: int = scram.DEFAULT_ITERATIONS, reps: int = 50) -> float:
    """Milliseconds of one PBKDF2-HMAC-SHA256 (what SCRAM costs per login uncached)."""
    salt = os.urandom(scram.SALT_LENGTH)
    t0 = time.perf_counter()
    for i in range(reps):
        hashlib.pbkdf2_hmac("sha256", f"password{i}".encode(), salt, iterations)
    return (time.perf_counter() - t0) * 1000 / reps


def exchange_us(reps: int = 500) -> float:
    """Microseconds of pgproxy's side of one SCRAM exchange with a stored verifier (no
    PBKDF2): ScramServer's two steps, timed alone (the client's steps are not counted)."""
    verifier = scram.ScramVerifier.from_password(PASSWORD)
    spent = 0.0
    for _ in range(reps):
        client = scram_client.ScramClient(PASSWORD)
        first = client.client_first()
        t0 = time.perf_counter()
        server = scram_server.ScramServer(verifier)
        server_first = server.handle_client_first(first)
        spent += time.perf_counter() - t0
        final = client.handle_server_first(server_first)
        t0 = time.perf_counter()
        ok = server.handle_client_final(final)
        spent += time.perf_counter() - t0
        assert ok is not None
    return spent * 1e6 / reps


# --- tracemalloc -----------------------------------------------------------------------------


@dataclass
class TraceRow:
    where: str
    kib_per_client: float
    blocks_per_client: float


async def trace_memory(tmp: Path, cluster: PgCluster, n: int, concurrency: int) -> list[TraceRow]:
    """Run pgproxy under tracemalloc (bench/_instrumented_pgproxy.py), snapshot before and after
    ``n`` idle clients log in, and list the source lines that grew most."""
    proc, port = start_pgproxy(tmp, cluster.port, "verifier", n + 100, traced=True)
    dumps = [tmp / "trace-0", tmp / "trace-1"]
    try:
        warm = await login(port, PASSWORD)
        await close_all([warm])
        await settle()
        await probe(proc.pid, TRACE_SIGNAL, dumps[0])
        clients, errors = await connect_many(port, PASSWORD, n, concurrency, "idle")
        try:
            if errors:
                raise RuntimeError(f"{len(errors)} logins failed under tracemalloc: {errors[0]!r}")
            await settle()
            await probe(proc.pid, TRACE_SIGNAL, dumps[1])
        finally:
            await close_all(clients)
    finally:
        stop_server(proc)
    old, new = (tracemalloc.Snapshot.load(str(p)) for p in dumps)
    stats = new.compare_to(old, "lineno")
    rows = []
    for st in stats[:12]:
        frame = st.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()
        where = f"`{_short(frame.filename)}:{frame.lineno}` {code[:70]}".replace("|", "\\|")
        rows.append(TraceRow(where, st.size_diff / 1024 / n, st.count_diff / n))
    total = sum(st.size_diff for st in stats) / 1024 / n
    rows.append(TraceRow("**total** (all lines)", total, sum(st.count_diff for st in stats) / n))
    return rows


def _short(path: str) -> str:
    for marker in ("/pgproxy/", "/site-packages/", "/lib/python3"):
        if marker in path:
            return path[path.index(marker) + 1 :]
    return path


async def probe(pid: int, sig: int, path: Path) -> None:
    """Signal the instrumented pgproxy and wait for the file it writes in answer."""
    os.kill(pid, sig)
    for _ in range(600):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"pgproxy wrote no {path}")


async def pbkdf2_count(pid: int, tmp: Path, k: int) -> int:
    path = tmp / f"pbkdf2-{k}"
    await probe(pid, COUNT_SIGNAL, path)
    return int(path.read_text())


# --- report ----------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(
    mem: list[MemRow],
    storms: list[StormRow],
    trace: list[TraceRow],
    pbkdf2: float,
    exch: float,
    args: argparse.Namespace,
    machine: str,
    nofile: tuple[int, int],
) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        f'pgproxy transaction mode, `auth_type = "scram-sha-256"`, user `{USER}` stored as a '
        f"SCRAM verifier (memory rows), log_level warning; RLIMIT_NOFILE {nofile[0]}; a fresh "
        "pgproxy per row. Clients: raw asyncio sockets doing startup + SCRAM with pgproxy's own "
        "message builders and ScramClient, in this one process.",
        "",
    ]
    if mem:
        lines += [
            f"RSS per idle client = (pgproxy VmRSS with N clients - VmRSS with 0) / N, 1 s after "
            f"the last login; 'with 0' is after one warm-up client logged in (and LISTENed, for "
            f"the listen kinds) and left. Logins {args.concurrency} at a time. Target: <= "
            f"{TARGET_KIB} KiB.",
            "",
            "| clients | kind | pgproxy RSS 0 -> N MiB | RSS per idle client KiB | within target "
            "| connect all s | logins/s |",
            "|---:|---|---|---:|---|---:|---:|",
        ]
        for r in mem:
            ok = (
                "yes"
                if r.per_client_kib <= TARGET_KIB
                else f"NO (+{r.per_client_kib - TARGET_KIB:.1f})"
            )
            lines.append(
                f"| {r.clients} | {r.kind} | {r.rss_before / 1024:.1f} -> {r.rss_after / 1024:.1f} "
                f"| {r.per_client_kib:.1f} | {ok} | {r.connect_s:.2f} "
                f"| {r.clients / r.connect_s:.0f} |"
            )
        lines.append("")
    if storms:
        lines += [
            "Login storm: N clients start the TCP connect + startup + SCRAM-SHA-256 at the same "
            "moment against a pgproxy that has had no login yet (its pool opens its first "
            "upstream connection during the storm; 'after 1 login': one login went first). "
            "Login time = connect start -> ReadyForQuery, per client. "
            "pgproxy CPU = /proc/PID/stat during the storm.",
            "",
            "| stored secret | clients | total s | logins/s | login p50 / p99 / max ms "
            "| pgproxy CPU s (user / sys) | pgproxy CPU us per login | PBKDF2 runs in pgproxy |",
            "|---|---:|---:|---:|---|---|---:|---:|",
        ]
        for s in storms:
            lat = s.logins
            if lat:
                dist = (
                    f"{fmt_ms(percentile(lat, 0.5))} / {fmt_ms(percentile(lat, 0.99))} / "
                    f"{fmt_ms(lat[-1])}"
                )
            else:
                dist = "-"
            label = {
                "trust": "none (`auth_type = trust`)",
                "verifier": "SCRAM verifier",
                "plain": "plain password (cache cold)",
                "plain-warm": "plain password (after 1 login)",
            }[s.secret]
            cpu = s.proxy_cpu[0] + s.proxy_cpu[1]
            lines.append(
                f"| {label} | {s.clients} | {s.total_s:.2f} | {len(lat) / s.total_s:.0f} | {dist} "
                f"| {cpu:.2f} ({s.proxy_cpu[0]:.2f} / {s.proxy_cpu[1]:.2f}) "
                f"| {cpu * 1e6 / s.clients:.0f} | {s.pbkdf2} |"
            )
        lines += [
            "",
            f"PBKDF2-HMAC-SHA256, {scram.DEFAULT_ITERATIONS} iterations, measured here: "
            f"**{pbkdf2:.2f} ms** per derivation (one core); {args.storm or 2000} uncached "
            f"derivations would be {pbkdf2 * (args.storm or 2000) / 1000:.1f} s of CPU. One SCRAM "
            f"exchange without PBKDF2 (pgproxy's ScramServer steps with a stored verifier: "
            f"HMAC/SHA-256 only), timed alone: {exch:.0f} us.",
            "",
        ]
    if trace:
        lines += [
            f"What holds the memory of {args.trace} idle clients (pgproxy under tracemalloc, "
            "snapshot after - before, by source line; Python allocations only, so the total is "
            "below the RSS figure, which also has the allocator's and uvloop/libuv's own):",
            "",
            "| allocated at | KiB per client | blocks per client |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {t.where} | {t.kib_per_client:.2f} | {t.blocks_per_client:.1f} |" for t in trace
        ]
        lines.append("")
    failures = [
        f"memory {r.kind} n={r.clients}: {'; '.join(r.failures)}" for r in mem if r.failures
    ]
    failures += [
        f"storm {s.secret} n={s.clients}: {'; '.join(s.failures)}" for s in storms if s.failures
    ]
    if failures:
        lines += ["FAILED: " + f for f in failures]
    else:
        lines.append(f"{OK_LINE} (no login failed in any row).")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


async def run_all(
    args: argparse.Namespace, cluster: PgCluster, tmp: Path
) -> tuple[list[MemRow], list[StormRow], list[TraceRow]]:
    mem = [
        await measure_memory(tmp, cluster, kind, n, args)
        for n in args.clients
        for kind in args.kinds
    ]
    storms = []
    if args.storm:
        storms = [await measure_storm(tmp, cluster, s, args.storm) for s in args.secrets]
    trace = await trace_memory(tmp, cluster, args.trace, args.concurrency) if args.trace else []
    return mem, storms, trace


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile()
    need = max([*args.clients, args.storm, args.trace]) + 200
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < need:
        print(f"warning: RLIMIT_NOFILE {nofile[0]} is below ~{need}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-memory-"))
    cluster = PgCluster(settings={"max_connections": 100})
    try:
        cluster.start()
        cluster.psql(f"create role {USER} login")
        pbkdf2 = pbkdf2_ms()
        exch = exchange_us()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            mem, storms, trace = runner.run(run_all(args, cluster, tmp))
        text = report(
            mem,
            storms,
            trace,
            pbkdf2,
            exch,
            args,
            machine_line(cluster.bindir, psycopg_version()),
            nofile,
        )
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0 if OK_LINE in text else 1
    except BaseException:
        log = tmp / "pgproxy.log"
        if log.exists():
            print(
                f"pgproxy log (tail):\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr
            )
        raise
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
