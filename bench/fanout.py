"""LISTEN fan-out: many idle listening clients through pgproxy vs. direct PostgreSQL.

Everything runs on this machine: a throwaway cluster (max_connections 100), pgproxy as a
subprocess (transaction mode, pool size 5), N psycopg clients that each ``LISTEN bench``
through it, and a publisher connected directly to PostgreSQL that sends sequenced
notifications, one per transaction: first at a steady pace, then a burst.  For comparison,
as many clients as ``max_connections`` allows LISTEN on PostgreSQL directly.

    .venv/bin/python -m bench.fanout --listeners 100,1000 --notifications 200

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psycopg
import uvloop

from bench.throughput import clean_env, free_port, percentile, start_server, stop_server
from pgproxy.testing.cluster import PgCluster

REPO = Path(__file__).resolve().parent.parent
CHANNEL = "bench"
MAX_CONNECTIONS = 100
POOL_SIZE = 5
NOTIFY_BUFFER = 8 * 1024 * 1024
LISTENER_APP = "fanout-listener"
PUBLISHER_APP = "fanout-publisher"
STATS_APP = "fanout-stats"
EXACTLY_ONCE_OK = "exactly-once and in-order: OK"
CAVEAT = (
    "Caveat: the receiving clients are Python (psycopg, one asyncio/uvloop process) and share "
    "the machine's {cores} core(s) with pgproxy and PostgreSQL; every latency and rate below "
    "includes the receivers' own CPU time and scheduling delays, so it is an upper bound for "
    "pgproxy's fan-out cost, not a measure of it alone."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n")[0])
    p.add_argument(
        "--listeners",
        type=lambda s: [int(c) for c in s.split(",") if c.strip()],
        default=[100, 1000],
        help="listening clients through pgproxy (list; one run per value)",
    )
    p.add_argument(
        "--notifications",
        type=int,
        default=200,
        help="notifications per phase: this many paced, then a burst of as many",
    )
    p.add_argument("--interval-ms", type=float, default=5.0, help="pace of the steady phase")
    p.add_argument(
        "--direct", type=int, default=80, help="listeners directly on PostgreSQL (0 = skip)"
    )
    p.add_argument("--concurrency", type=int, default=50, help="connections opened at a time")
    p.add_argument("--timeout", type=float, default=120.0, help="max wait for deliveries (s)")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    # Internal: the publisher runs as a subprocess of its own (see publish()).
    p.add_argument("--publish", metavar="DSN", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.listeners, args.notifications, args.direct = [20], 20, 0
    if args.direct + 10 > MAX_CONNECTIONS:
        p.error(f"--direct must leave room under max_connections={MAX_CONNECTIONS}")
    if any(n < 1 for n in args.listeners) or args.notifications < 1:
        p.error("--listeners and --notifications must be positive")
    return args


# --- the publisher (a subprocess, so its pace does not depend on the receivers' loop) --------


def publish(dsn: str, first: int, count: int, interval_ms: float) -> None:
    """Send ``count`` notifications ``'<seq>:<monotonic ns at send>'``, one per transaction
    (autocommit), every ``interval_ms`` (0: back to back).  CLOCK_MONOTONIC is system-wide
    on Linux, so the receivers' clock is the same one."""
    with psycopg.connect(dsn, autocommit=True, application_name=PUBLISHER_APP) as conn:
        conn.execute("select 1")
        step = interval_ms / 1000
        tick = time.monotonic()
        for seq in range(first, first + count):
            if step:
                delay = tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                tick += step
            conn.execute(f"select pg_notify('{CHANNEL}', '{seq}:{time.monotonic_ns()}')")


async def run_publisher(dsn: str, first: int, count: int, interval_ms: float) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fanout", "--publish", dsn, "--first", str(first),
        "--count", str(count), "--interval-ms", str(interval_ms),
        cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    rc = await proc.wait()
    if rc != 0:
        raise RuntimeError(f"publisher exited with {rc}")


# --- the receivers ---------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    first: int
    count: int
    sent: dict[int, int] = field(default_factory=dict)  # seq -> send ns
    last: dict[int, int] = field(default_factory=dict)  # seq -> latest receive ns
    got: dict[int, int] = field(default_factory=dict)  # seq -> deliveries so far
    complete: int = 0  # seqs delivered to every listener
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Row:
    target: str
    listeners: int
    connect_s: float
    backends_listener: int
    backends_other: int
    rss_before: int | None = None  # kB
    rss_after: int | None = None
    rss_end: int | None = None
    phases: list[Phase] = field(default_factory=list)
    # (user, system) CPU seconds used during the burst by pgproxy and by this process
    burst_cpu_proxy: tuple[float, float] | None = None
    burst_cpu_receivers: tuple[float, float] | None = None
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # pgproxy's WARNING/ERROR lines in this run


class Receivers:
    """N listening connections; every notification is timestamped when psycopg yields it."""

    def __init__(self, phases: list[Phase], n: int) -> None:
        self.phases = phases
        self.n = n
        self.seen: list[list[int]] = [[] for _ in range(n)]
        self.errors: list[BaseException] = []

    def _phase(self, seq: int) -> Phase | None:
        for ph in self.phases:
            if ph.first <= seq < ph.first + ph.count:
                return ph
        return None

    async def receive(self, idx: int, conn: psycopg.AsyncConnection[object]) -> None:
        seen = self.seen[idx]
        try:
            async for note in conn.notifies():
                now = time.monotonic_ns()
                seq_text, _, sent_text = note.payload.partition(":")
                seq = int(seq_text)
                seen.append(seq)
                ph = self._phase(seq)
                if ph is None or note.channel != CHANNEL:
                    continue
                ph.sent[seq] = int(sent_text)
                if now > ph.last.get(seq, 0):
                    ph.last[seq] = now
                got = ph.got[seq] = ph.got.get(seq, 0) + 1
                if got == self.n:
                    ph.complete += 1
                    if ph.complete == ph.count:
                        ph.done.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a lost connection is a failed run, not a hang
            self.errors.append(exc)
            for ph in self.phases:
                ph.done.set()


async def open_listeners(
    dsn: str, n: int, concurrency: int
) -> list[psycopg.AsyncConnection[object]]:
    """``n`` autocommit connections that each ran ``LISTEN bench`` (a simple Query), opened
    ``concurrency`` at a time.  On any failure all of them are closed again."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> psycopg.AsyncConnection[object]:
        async with sem:
            conn = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, prepare_threshold=None, application_name=LISTENER_APP,
                connect_timeout=30,
            )  # fmt: skip
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
            except BaseException:
                await conn.close()
                raise
            return conn

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    conns = [r for r in results if isinstance(r, psycopg.AsyncConnection)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_all(conns)
        raise RuntimeError(
            f"{len(failures)} of {n} listeners failed to connect/LISTEN; first: {failures[0]!r}"
        )
    return conns


async def close_all(conns: list[psycopg.AsyncConnection[object]]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def backend_counts(stats: psycopg.AsyncConnection[object]) -> tuple[int, int]:
    """(listener backends, other client backends), the publisher and this query excluded."""
    cur = await stats.execute(
        "select count(*) filter (where application_name = 'pgproxy-listener'),"
        " count(*) filter (where application_name <> 'pgproxy-listener')"
        " from pg_stat_activity where backend_type = 'client backend'"
        " and pid <> pg_backend_pid() and application_name not in (%s, %s)",
        (PUBLISHER_APP, STATS_APP),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def cpu_s(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` so far; of this process for None."""
    if pid is None:
        t = os.times()
        return t.user, t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_delta(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


def rss_kb(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match[1])


async def measure(
    target: str,
    dsn: str,
    pg_dsn: str,
    n: int,
    args: argparse.Namespace,
    proxy_pid: int | None,
) -> Row:
    """Connect ``n`` listeners to ``dsn``, run the steady phase then the burst, check."""
    steady = Phase("steady", 0, args.notifications)
    burst = Phase("burst", args.notifications, args.notifications)
    phases = [steady, burst]
    total = steady.count + burst.count
    async with await psycopg.AsyncConnection.connect(
        pg_dsn, autocommit=True, application_name=STATS_APP
    ) as stats:
        if proxy_pid is not None:
            # Warm-up: the first LISTEN loads the parser and starts the upstream listener.
            warm = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, prepare_threshold=None
            )
            await warm.execute("LISTEN warmup")
            await warm.close()
            await asyncio.sleep(0.5)
        rss_before = rss_kb(proxy_pid) if proxy_pid else None
        print(f"[{target} n={n}] connecting {n} listeners ...", file=sys.stderr)
        t0 = time.monotonic()
        conns = await open_listeners(dsn, n, args.concurrency)
        connect_s = time.monotonic() - t0
        try:
            await asyncio.sleep(0.5)
            rss_after = rss_kb(proxy_pid) if proxy_pid else None
            lst, other = await backend_counts(stats)
            row = Row(target, n, connect_s, lst, other, rss_before, rss_after, phases=phases)
            recv = Receivers(phases, n)
            tasks = [asyncio.create_task(recv.receive(i, c)) for i, c in enumerate(conns)]
            try:
                await asyncio.sleep(0.3)  # every receiver is waiting in notifies()
                for ph, interval in ((steady, args.interval_ms), (burst, 0.0)):
                    print(f"[{target} n={n}] {ph.name}: {ph.count} notifications", file=sys.stderr)
                    proxy0, self0 = (cpu_s(proxy_pid) if proxy_pid else None), cpu_s(None)
                    await run_publisher(pg_dsn, ph.first, ph.count, interval)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ph.done.wait(), args.timeout)
                    if ph is burst:
                        row.burst_cpu_receivers = cpu_delta(self0, cpu_s(None))
                        if proxy_pid and proxy0:
                            row.burst_cpu_proxy = cpu_delta(proxy0, cpu_s(proxy_pid))
                    if recv.errors:
                        break
                    if not ph.done.is_set():
                        row.problems.append(
                            f"{ph.name}: only {ph.complete}/{ph.count} notifications reached "
                            f"all {n} listeners within {args.timeout:.0f} s"
                        )
                        break
                await asyncio.sleep(0.3)  # anything extra (a duplicate) would arrive now
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            lst2, other2 = await backend_counts(stats)
            row.backends_listener = max(lst, lst2)
            row.backends_other = max(other, other2)
            row.rss_end = rss_kb(proxy_pid) if proxy_pid else None
        finally:
            await close_all(conns)
    row.problems += [f"receiver error: {e!r}" for e in recv.errors[:3]]
    want = list(range(total))
    bad = [i for i, seen in enumerate(recv.seen) if seen != want]
    for i in bad[:3]:
        seen = recv.seen[i]
        dup = len(seen) - len(set(seen))
        missing = len(set(want) - set(seen))
        order = "in order" if seen == sorted(seen) else "OUT OF ORDER"
        row.problems.append(
            f"listener {i}: {len(seen)} received, {missing} missing, {dup} duplicated, {order}"
        )
    if bad:
        row.problems.append(f"{len(bad)} of {n} listeners did not get exactly 0..{total - 1}")
    row.ok = not row.problems
    return row


# --- pgproxy ---------------------------------------------------------------------------------


def start_pgproxy(tmp: Path, pg_port: int, max_clients: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = tmp / "pgproxy-fanout.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f"default_pool_size = {POOL_SIZE}\nmax_client_conn = {max_clients}\n"
        f'notify_buffer_size = {NOTIFY_BUFFER}\nlog_level = "warning"\n'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
    )
    # RLIMIT_NOFILE is inherited: raise_nofile() already ran in this process.
    cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
    return start_server("pgproxy", cmd, port, tmp / "pgproxy.log"), port


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) now in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- report ----------------------------------------------------------------------------------


def lat_stats(ph: Phase) -> tuple[float, float, float]:
    """p50/p99/max (ms) over notifications of the latency to the LAST listener."""
    lats = sorted((ph.last[s] - ph.sent[s]) / 1e6 for s in ph.last if s in ph.sent)
    if len(lats) < ph.count:
        return (math.nan, math.nan, math.nan)
    return percentile(lats, 0.5), percentile(lats, 0.99), lats[-1]


def burst_rate(ph: Phase, n: int) -> float:
    """Deliveries per second: all of the burst's, over first send -> last delivery."""
    if not ph.sent or len(ph.last) < ph.count:
        return math.nan
    span = (max(ph.last.values()) - ph.sent[ph.first]) / 1e9
    return n * ph.count / span


def machine_line(bindir: Path) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, TypeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())[1]
    postgres = subprocess.run([bindir / "postgres", "--version"], capture_output=True, text=True)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, uvloop {metadata.version('uvloop')}, "
        f"psycopg {metadata.version('psycopg')}, {postgres.stdout.strip()}; "
        f"pgproxy {commit or '?'}"
    )


def fmt(value: float, spec: str = ".1f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:{spec}}"
    )


def report(rows: list[Row], args: argparse.Namespace, machine: str, nofile: tuple[int, int]) -> str:
    def per_delivery_us(cpu: tuple[float, float] | None, r: Row) -> str:
        if cpu is None:
            return "-"
        user, system = (t * 1e6 / (r.listeners * args.notifications) for t in cpu)
        return f"{user + system:.1f} ({user:.1f} / {system:.1f})"

    lines = [
        f"Machine: {machine}",
        "",
        f"PostgreSQL max_connections {MAX_CONNECTIONS}; pgproxy transaction mode, pool size "
        f"{POOL_SIZE}, notify_buffer_size {NOTIFY_BUFFER // 1024 // 1024} MiB; "
        f"RLIMIT_NOFILE {nofile[0]}. Each listener: psycopg AsyncConnection, autocommit, "
        f"`LISTEN {CHANNEL}` (simple Query). Publisher directly on PostgreSQL, one "
        f"`pg_notify` per transaction: {args.notifications} every {args.interval_ms:g} ms "
        f"(steady), then {args.notifications} back to back (burst).",
        "",
        "Latency = receive time - send time of a notification (same clock); p50 / p99 / max are "
        "over notifications of the latency to the LAST listener that got it. Burst rate = "
        "deliveries of the burst / (first burst send -> last burst delivery). Steady offered = "
        "listeners x notifications per second: where it exceeds the burst rate the steady "
        "phase is saturated and its latency is mostly queueing.",
        "",
        "| target | listeners | steady offered deliveries/s | steady p50 / p99 / max ms "
        "| burst p50 / p99 / max ms | burst deliveries/s "
        "| pgproxy CPU us/delivery, burst (user / sys) "
        "| receivers CPU us/delivery, burst (user / sys) | exactly-once, in order |",
        "|---|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        steady, burst = r.phases
        s50, s99, smax = lat_stats(steady)
        b50, b99, bmax = lat_stats(burst)
        offered = r.listeners * 1000 / args.interval_ms if args.interval_ms else math.nan
        rate = burst_rate(burst, r.listeners)
        flag = " (saturated)" if offered > rate else ""
        lines.append(
            f"| {r.target} | {r.listeners} | {fmt(offered, '.0f')}{flag} "
            f"| {fmt(s50)} / {fmt(s99)} / {fmt(smax)} | {fmt(b50)} / {fmt(b99)} / {fmt(bmax)} "
            f"| {fmt(rate, '.0f')} | {per_delivery_us(r.burst_cpu_proxy, r)} "
            f"| {per_delivery_us(r.burst_cpu_receivers, r)} | {'yes' if r.ok else 'NO'} |"
        )
    lines += [
        "",
        "| target | listeners | upstream: pgproxy-listener backends | upstream: other client "
        "backends | connect all s | pgproxy RSS before -> after MiB | RSS per idle client KiB "
        "| pgproxy RSS at end MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if r.rss_before is not None and r.rss_after is not None:
            rss = f"{r.rss_before / 1024:.1f} -> {r.rss_after / 1024:.1f}"
            per = fmt((r.rss_after - r.rss_before) / r.listeners)
            end = fmt(r.rss_end / 1024 if r.rss_end is not None else math.nan)
        else:
            rss = per = end = "-"
        listener = str(r.backends_listener) if r.target == "pgproxy" else "-"
        lines.append(
            f"| {r.target} | {r.listeners} | {listener} | {r.backends_other} "
            f"| {r.connect_s:.2f} | {rss} | {per} | {end} |"
        )
    lines.append("")
    for r in rows:
        if r.ok:
            lines.append(
                f"{r.target} n={r.listeners}: {EXACTLY_ONCE_OK} at every one of {r.listeners} "
                f"listeners ({2 * args.notifications} notifications each)."
            )
        else:
            lines.append(f"{r.target} n={r.listeners}: FAILED: " + "; ".join(r.problems))
    for r in rows:
        if r.target == "pgproxy":
            shown = "".join(f"\n    {ln}" for ln in r.log[:5])
            more = f"\n    ... and {len(r.log) - 5} more" if len(r.log) > 5 else ""
            lines.append(
                f"pgproxy log n={r.listeners}: {len(r.log)} warning/error line(s){shown}{more}"
            )
    lines += [
        "",
        "Upstream backends: client backends in pg_stat_activity while the listeners were "
        "connected and after the run (maximum), not counting the publisher or the query "
        "itself. 'Other' for pgproxy = its pooled servers (LISTEN needs none); for direct, one "
        "per listener. RSS per idle client = (pgproxy RSS after connecting and LISTENing all "
        "listeners - RSS before) / listeners; 'before' is after one warm-up client LISTENed "
        "and left; pgproxy is started afresh for every row. CPU us/delivery = CPU time of "
        "pgproxy (/proc/PID/stat) or of this receiving process during the burst / its "
        "deliveries.",
        "",
        CAVEAT.format(cores=os.cpu_count()),
    ]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, cluster: PgCluster, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    pg_dsn = cluster.dsn()
    log = tmp / "pgproxy.log"
    for n in args.listeners:
        offset = log.stat().st_size if log.exists() else 0
        proc, port = start_pgproxy(tmp, cluster.port, max(n + 100, 1000))
        try:
            dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            rows.append(await measure("pgproxy", dsn, pg_dsn, n, args, proc.pid))
        finally:
            stop_server(proc)
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        rows[-1].log = [
            ln for ln in text.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", ln)
        ]
    if args.direct:
        rows.append(await measure("direct", pg_dsn, pg_dsn, args.direct, args, None))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.publish:
        publish(args.publish, args.first, args.count, args.interval_ms)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile()
    need = 2 * max(args.listeners) + 200  # our sockets + pgproxy's (it inherits the limit)
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < need:
        print(
            f"warning: RLIMIT_NOFILE {nofile[0]} (hard {nofile[1]}) is below ~{need}; "
            "connections may fail",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-fanout-"))
    cluster = PgCluster(settings={"max_connections": MAX_CONNECTIONS})
    try:
        cluster.start()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            rows = runner.run(run_all(args, cluster, tmp))
        text = report(rows, args, machine_line(cluster.bindir), nofile)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0 if all(r.ok for r in rows) else 1
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was already stopped by main()'s finally
        print("interrupted", file=sys.stderr)
        sys.exit(130)
