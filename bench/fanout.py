"""LISTEN fan-out: many idle listening clients through pgproxy vs. direct PostgreSQL.

Everything runs on this machine: a throwaway cluster (max_connections 100), pgproxy as a
subprocess (transaction mode, pool size 5), N clients (psycopg, or ``--client raw`` sockets,
spread over ``--procs`` receiving processes) that each ``LISTEN bench`` through it, and a
publisher connected directly to PostgreSQL that sends sequenced notifications, one per
transaction: first at a steady pace, then a burst.  For comparison, as many clients as
``max_connections`` allows LISTEN on PostgreSQL directly.

    .venv/bin/python -m bench.fanout --listeners 100,1000 --notifications 200

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
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
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import psycopg
import uvloop

from bench.throughput import machine_line, percentile, pgproxy_tree, start_server
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import clean_env, free_port, raise_nofile, stop_server

REPO = Path(__file__).resolve().parent.parent
CHANNEL = "bench"
MAX_CONNECTIONS = 100
POOL_SIZE = 5
NOTIFY_BUFFER = 8 * 1024 * 1024
LISTENER_APP = "fanout-listener"
PUBLISHER_APP = "fanout-publisher"
STATS_APP = "fanout-stats"
CLIENTS = {
    "psycopg": "psycopg AsyncConnection, autocommit",
    "raw": "raw asyncio socket (startup, Query and NotificationResponse via "
    "pgproxy.protocol.messages)",
    "c": "a C epoll loop (bench/fanout_receiver.c: startup, Query, NotificationResponse; "
    "one read() per ready socket)",
}
RECEIVER_SOURCE = Path(__file__).resolve().parent / "fanout_receiver.c"
VIA = {"tcp": "over TCP loopback", "unix": "over the unix-domain socket"}
EXACTLY_ONCE_OK = "exactly-once and in-order: OK"
CAVEAT = (
    "Caveat: the receiving clients ({client}, {procs} process(es)) share the machine's {cores} "
    "core(s) with pgproxy and PostgreSQL; every latency and rate below includes the receivers' "
    "own CPU time and scheduling delays, so it is an upper bound for pgproxy's fan-out cost, not "
    "a measure of it alone."
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
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="receiving processes the listeners are spread over (so they are not the limit)",
    )
    p.add_argument(
        "--client",
        choices=tuple(CLIENTS),
        default="psycopg",
        help="listening clients: psycopg AsyncConnections, raw asyncio sockets parsing "
        "NotificationResponse with pgproxy.protocol.messages (cheaper per delivery), or c: "
        "bench/fanout_receiver.c built with the system C compiler (cheapest: the receivers "
        "take least of the machine from pgproxy)",
    )
    p.add_argument(
        "--via",
        choices=("tcp", "unix"),
        default="tcp",
        help="how the listeners connect (to pgproxy and, for --direct, to PostgreSQL): TCP "
        "loopback, or the unix-domain socket (pgproxy's unix_socket_dir)",
    )
    p.add_argument(
        "--pgproxy-compiled",
        action="store_true",
        help="run the mypyc build in build/compiled (run scripts/build-compiled first)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="max wait for deliveries (s)")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pgproxy `workers = N` (SO_REUSEPORT processes, one listener connection each); "
        "RSS and CPU are summed over its process tree",
    )
    # Internal: the publisher runs as a subprocess of its own (see publish()).
    p.add_argument("--publish", metavar="DSN", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--receive", metavar="DSN", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.receiver_binary = None  # --client c: built by main()
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
    first_rx: dict[int, int] = field(default_factory=dict)  # seq -> earliest receive ns
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
    # (user, system) CPU seconds used during a phase by pgproxy / the receiving processes
    burst_cpu_proxy: tuple[float, float] | None = None
    burst_cpu_receivers: tuple[float, float] | None = None
    steady_cpu_proxy: tuple[float, float] | None = None
    steady_cpu_receivers: tuple[float, float] | None = None
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
        self.closing = False

    def _phase(self, seq: int) -> Phase | None:
        for ph in self.phases:
            if ph.first <= seq < ph.first + ph.count:
                return ph
        return None

    def note(self, idx: int, channel: str, payload: str, now: int) -> None:
        """One notification received by listener ``idx`` at ``now`` (monotonic ns)."""
        seq_text, _, sent_text = payload.partition(":")
        seq = int(seq_text)
        self.seen[idx].append(seq)
        ph = self._phase(seq)
        if ph is None or channel != CHANNEL:
            return
        ph.sent[seq] = int(sent_text)
        if now > ph.last.get(seq, 0):
            ph.last[seq] = now
        if seq not in ph.first_rx:
            ph.first_rx[seq] = now  # each process notes in time order
        got = ph.got[seq] = ph.got.get(seq, 0) + 1
        if got == self.n:
            ph.complete += 1
            if ph.complete == ph.count:
                ph.done.set()

    def failed(self, exc: BaseException) -> None:
        """A lost connection is a failed run, not a hang."""
        self.errors.append(exc)
        for ph in self.phases:
            ph.done.set()

    async def receive(self, idx: int, conn: psycopg.AsyncConnection[object]) -> None:
        try:
            async for note in conn.notifies():
                self.note(idx, note.channel, note.payload, time.monotonic_ns())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failed(exc)


class RawListener(asyncio.Protocol):
    """A listening client without a driver (``--client raw``): startup (trust), ``LISTEN
    bench``, then NotificationResponses parsed straight from the socket, all those of one
    read stamped with that read's time.  About a third of psycopg's CPU per delivery, so
    the receiving side takes less of the machine from pgproxy."""

    def __init__(self, idx: int, recv: Receivers) -> None:
        self.idx = idx
        self.recv = recv
        self.buf = bytearray()
        self.ready = asyncio.get_running_loop().create_future()
        self.readies = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        self.transport.write(m.startup_message({"user": "postgres", "database": "postgres"}))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5])
            if end - pos - 1 < length:
                break
            kind = buf[pos]
            if kind == m.NOTIFICATION_RESPONSE:
                note = m.parse_notification(bytes(buf[pos + 5 : pos + 1 + length]))
                self.recv.note(self.idx, note.channel, note.payload, now)
            elif kind == m.READY_FOR_QUERY:
                self.readies += 1
                if self.readies == 1 and self.transport is not None:
                    self.transport.write(m.query(f"LISTEN {CHANNEL}"))
                elif self.readies == 2 and not self.ready.done():
                    self.ready.set_result(None)
            elif kind == m.ERROR_RESPONSE:
                fields = m.parse_error_fields(bytes(buf[pos + 5 : pos + 1 + length]))
                self._fail(RuntimeError(f"{fields.get('C')} {fields.get('M')}"))
            pos += 1 + length
        del buf[:pos]

    def _fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        else:
            self.recv.failed(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.recv.closing:
            self._fail(ConnectionError(f"listener {self.idx} lost: {exc!r}"))


def listener_address(dsn: str) -> tuple[str, int]:
    """(host or socket directory, port) of a ``postgresql://`` URL, as dsn_for() writes it."""
    url = urlsplit(dsn)
    query = parse_qs(url.query)
    if "host" in query:
        return query["host"][0], int(query["port"][0])
    return url.hostname or "", url.port or 5432


def dsn_for(via: str, host: str, socket_dir: Path, port: int) -> str:
    if via == "unix":
        return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
    return f"postgresql://postgres@{host}:{port}/postgres"


async def open_raw_listeners(
    host: str, port: int, recv: Receivers, concurrency: int
) -> list[RawListener]:
    """``recv.n`` RawListeners, ``concurrency`` logging in at a time."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)

    async def one(idx: int) -> RawListener:
        async with sem:
            if host.startswith("/"):  # a socket directory, as libpq reads it
                path = os.path.join(host, f".s.PGSQL.{port}")
                _, proto = await loop.create_unix_connection(lambda: RawListener(idx, recv), path)
            else:
                _, proto = await loop.create_connection(lambda: RawListener(idx, recv), host, port)
            await asyncio.wait_for(proto.ready, 30)
            return proto

    return list(await asyncio.gather(*(one(i) for i in range(recv.n))))


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


async def backend_counts(stats: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (pgproxy with ``workers = N``: supervisor + workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss_kb(pid: int) -> int:
    return sum(rss_kb(p) for p in process_tree(pid))


def tree_cpu_s(pid: int) -> tuple[float, float]:
    times = [cpu_s(p) for p in process_tree(pid)]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def make_phases(notifications: int) -> list[Phase]:
    return [Phase("steady", 0, notifications), Phase("burst", notifications, notifications)]


def listener_problems(seen: list[list[int]], total: int) -> tuple[int, list[str]]:
    """(listeners that did not get exactly 0..total-1 in order, up to 3 descriptions)."""
    want = list(range(total))
    bad = [i for i, s in enumerate(seen) if s != want]
    out = []
    for i in bad[:3]:
        got = seen[i]
        dup = len(got) - len(set(got))
        missing = len(set(want) - set(got))
        order = "in order" if got == sorted(got) else "OUT OF ORDER"
        out.append(
            f"listener {i}: {len(got)} received, {missing} missing, {dup} duplicated, {order}"
        )
    return len(bad), out


async def receive_main(args: argparse.Namespace) -> None:
    """One receiving process (``--receive DSN --count N``): N listeners, then on stdout
    ``ready``, ``done <phase>`` per phase (every notification of it reached all N, or a
    receiver failed), and after ``stop`` on stdin one JSON line with the timestamps and the
    exactly-once check.  The parent (measure()) merges the processes' results."""
    phases = make_phases(args.notifications)
    total = 2 * args.notifications
    recv = Receivers(phases, args.count)
    conns: list[psycopg.AsyncConnection[object]] = []
    raw: list[RawListener] = []
    tasks: list[asyncio.Task[None]] = []
    if args.client == "raw":
        host, port = listener_address(args.receive)
        raw = await open_raw_listeners(host, port, recv, args.concurrency)
    else:
        conns = await open_listeners(args.receive, args.count, args.concurrency)
        tasks = [asyncio.create_task(recv.receive(i, c)) for i, c in enumerate(conns)]
    try:
        await asyncio.sleep(0.3)  # every receiver is waiting for notifications
        print("ready", flush=True)
        stop = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))
        for ph in phases:
            done = asyncio.create_task(ph.done.wait())
            await asyncio.wait({done, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                done.cancel()
                break
            print(f"done {ph.name}", flush=True)
        await stop
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would arrive now
    finally:
        recv.closing = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(conns)
        for proto in raw:
            if proto.transport is not None:
                proto.transport.close()
    bad, problems = listener_problems(recv.seen, total)
    result = {
        "phases": [
            {"sent": ph.sent, "last": ph.last, "first": ph.first_rx, "complete": ph.complete}
            for ph in phases
        ],
        "bad": bad,
        "problems": problems,
        "errors": [repr(e) for e in recv.errors[:3]],
    }
    print(json.dumps(result), flush=True)


class ReceiverProcs:
    """The listeners, spread over ``procs`` receiving processes (receive_main())."""

    def __init__(self, dsn: str, n: int, args: argparse.Namespace) -> None:
        self.dsn = dsn
        self.n = n
        self.args = args
        k = max(1, min(args.procs, n))
        self.counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def command(self, count: int) -> list[str]:
        """One receiving process: the C receiver, or receive_main() in Python."""
        args = self.args
        if args.receiver_binary is not None:
            host, port = listener_address(self.dsn)
            return [str(args.receiver_binary), host, str(port), str(count), str(args.notifications)]
        concurrency = max(1, args.concurrency // len(self.counts))
        return [
            sys.executable, "-m", "bench.fanout", "--receive", self.dsn,
            "--count", str(count), "--notifications", str(args.notifications),
            "--concurrency", str(concurrency), "--client", args.client,
        ]  # fmt: skip

    async def start(self) -> None:
        for count in self.counts:
            proc = await asyncio.create_subprocess_exec(
                *self.command(count),
                cwd=REPO, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            self.procs.append(proc)
        await self.expect("ready", self.args.timeout + 60)

    async def line(self, proc: asyncio.subprocess.Process, timeout: float) -> str:
        assert proc.stdout is not None
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"receiving process {proc.pid} exited ({await proc.wait()})")
        return raw.decode().strip()

    async def expect(self, text: str, timeout: float) -> bool:
        """Wait for ``text`` from every process; False on a timeout."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                got = await self.line(proc, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if got != text:
                raise RuntimeError(f"receiving process {proc.pid} said {got!r}, not {text!r}")
        return True

    async def finish(self) -> list[dict[str, Any]]:
        """Tell every process to stop; their JSON results (skipping unread ``done`` lines)."""
        results = []
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
        for proc in self.procs:
            while True:
                text = await self.line(proc, 60)
                if text.startswith("{"):
                    results.append(json.loads(text))
                    break
        return results

    async def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def measure(
    target: str,
    dsn: str,
    pg_dsn: str,
    n: int,
    args: argparse.Namespace,
    proxy_pid: int | None,
) -> Row:
    """Connect ``n`` listeners to ``dsn`` (in ``--procs`` receiving processes), run the
    steady phase then the burst, merge and check."""
    steady, burst = phases = make_phases(args.notifications)
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
        rss_before = tree_rss_kb(proxy_pid) if proxy_pid else None
        receivers = ReceiverProcs(dsn, n, args)
        print(
            f"[{target} n={n}] connecting {n} listeners in {len(receivers.counts)} process(es)",
            file=sys.stderr,
        )
        t0 = time.monotonic()
        try:
            await receivers.start()
            connect_s = time.monotonic() - t0
            await asyncio.sleep(0.5)
            rss_after = tree_rss_kb(proxy_pid) if proxy_pid else None
            lst, other = await backend_counts(stats)
            row = Row(target, n, connect_s, lst, other, rss_before, rss_after, phases=phases)
            for ph, interval in ((steady, args.interval_ms), (burst, 0.0)):
                print(f"[{target} n={n}] {ph.name}: {ph.count} notifications", file=sys.stderr)
                proxy0 = tree_cpu_s(proxy_pid) if proxy_pid else None
                recv0 = [cpu_s(pid) for pid in receivers.pids]
                await run_publisher(pg_dsn, ph.first, ph.count, interval)
                done = await receivers.expect(f"done {ph.name}", args.timeout)
                deltas = [
                    cpu_delta(a, cpu_s(pid)) for a, pid in zip(recv0, receivers.pids, strict=True)
                ]
                recv_cpu = (sum(d[0] for d in deltas), sum(d[1] for d in deltas))
                proxy_cpu = (
                    cpu_delta(proxy0, tree_cpu_s(proxy_pid)) if proxy_pid and proxy0 else None
                )
                if ph is burst:
                    row.burst_cpu_receivers, row.burst_cpu_proxy = recv_cpu, proxy_cpu
                else:
                    row.steady_cpu_receivers, row.steady_cpu_proxy = recv_cpu, proxy_cpu
                if not done:
                    row.problems.append(
                        f"{ph.name}: not every notification reached all {n} listeners "
                        f"within {args.timeout:.0f} s"
                    )
                    break
            results = await receivers.finish()
            lst2, other2 = await backend_counts(stats)
            row.backends_listener = max(lst, lst2)
            row.backends_other = max(other, other2)
            row.rss_end = tree_rss_kb(proxy_pid) if proxy_pid else None
        finally:
            await receivers.kill()
    for i, ph in enumerate(phases):
        for res in results:
            part = res["phases"][i]
            for seq, ns in part["sent"].items():
                ph.sent[int(seq)] = ns
            for seq, ns in part["last"].items():
                ph.last[int(seq)] = max(ns, ph.last.get(int(seq), 0))
            for seq, ns in part["first"].items():
                ph.first_rx[int(seq)] = min(ns, ph.first_rx.get(int(seq), ns))
        ph.complete = min(res["phases"][i]["complete"] for res in results)
    for res in results:
        row.problems += [f"receiver error: {e}" for e in res["errors"]]
        row.problems += res["problems"]
    bad = sum(res["bad"] for res in results)
    if bad:
        row.problems.append(f"{bad} of {n} listeners did not get exactly 0..{total - 1}")
    row.ok = not row.problems
    return row


# --- pgproxy ---------------------------------------------------------------------------------


def start_pgproxy(
    tmp: Path, pg_port: int, max_clients: int, workers: int = 1, compiled: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """pgproxy listening on a free TCP port and on a unix socket in ``tmp``."""
    port = free_port()
    cwd = pgproxy_tree(compiled)
    config = tmp / "pgproxy-fanout.toml"
    # With workers, max_client_conn is divided among them and the kernel's spread of
    # connections is uneven: allow each worker all of them.
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        + (f"workers = {workers}\n" if workers > 1 else "")
        + f"default_pool_size = {POOL_SIZE}\nmax_client_conn = {max_clients * workers}\n"
        f'notify_buffer_size = {NOTIFY_BUFFER}\nlog_level = "warning"\n'
        f'unix_socket_dir = "{tmp}"\n'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
    )
    # RLIMIT_NOFILE is inherited: raise_nofile() already ran in this process.
    cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
    return start_server("pgproxy", cmd, port, tmp / "pgproxy.log", cwd), port


# --- report ----------------------------------------------------------------------------------


def lat_stats(ph: Phase) -> tuple[float, float, float]:
    """p50/p99/max (ms) over notifications of the latency to the LAST listener."""
    lats = sorted((ph.last[s] - ph.sent[s]) / 1e6 for s in ph.last if s in ph.sent)
    if len(lats) < ph.count:
        return (math.nan, math.nan, math.nan)
    return percentile(lats, 0.5), percentile(lats, 0.99), lats[-1]


def spread_stats(ph: Phase) -> tuple[float, float, float, float]:
    """p50/p99 (ms) of the latency to the FIRST listener, and p50/p99 of last - first (the
    time one notification takes to reach every listener once the first has it)."""
    seqs = [s for s in ph.last if s in ph.sent and s in ph.first_rx]
    if len(seqs) < ph.count:
        return (math.nan,) * 4
    first = sorted((ph.first_rx[s] - ph.sent[s]) / 1e6 for s in seqs)
    spread = sorted((ph.last[s] - ph.first_rx[s]) / 1e6 for s in seqs)
    return (
        percentile(first, 0.5), percentile(first, 0.99),
        percentile(spread, 0.5), percentile(spread, 0.99),
    )  # fmt: skip


def burst_rate(ph: Phase, n: int) -> float:
    """Deliveries per second: all of the burst's, over first send -> last delivery."""
    if not ph.sent or len(ph.last) < ph.count:
        return math.nan
    span = (max(ph.last.values()) - ph.sent[ph.first]) / 1e9
    return n * ph.count / span


def psycopg_version() -> str:
    return f"psycopg {metadata.version('psycopg')}"


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
        f"{POOL_SIZE}, notify_buffer_size {NOTIFY_BUFFER // 1024 // 1024} MiB"
        + (f", workers = {args.workers} (RSS and CPU summed)" if args.workers > 1 else "")
        + (", the optional mypyc build" if args.pgproxy_compiled else "")
        + "; "
        f"RLIMIT_NOFILE {nofile[0]}. Each listener: {CLIENTS[args.client]}, "
        f"{VIA[args.via]}, "
        f"`LISTEN {CHANNEL}` (simple Query); listeners spread over {args.procs} receiving "
        f"process(es). Publisher directly on PostgreSQL, one "
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
    lines.append("")
    for r in rows:
        rate = burst_rate(r.phases[1], r.listeners)
        if r.burst_cpu_proxy is None or r.burst_cpu_receivers is None or math.isnan(rate):
            continue
        span = r.listeners * args.notifications / rate
        used = (sum(r.burst_cpu_proxy) + sum(r.burst_cpu_receivers)) / span
        lines.append(
            f"{r.target} n={r.listeners}: during the burst ({span:.2f} s) pgproxy and the "
            f"receivers used {used:.2f} of the machine's {os.cpu_count()} cores; the rest went "
            "to PostgreSQL, the publisher and anything else running."
        )
    lines += [
        "",
        "Where the steady latency goes: to the FIRST listener (upstream -> pgproxy -> one "
        "client), and the spread last - first (pgproxy writing to every client, the receivers "
        "waking up); CPU per delivery over the steady phase.",
        "",
        "| target | listeners | steady first listener p50 / p99 ms | steady last - first p50 / "
        "p99 ms | pgproxy CPU us/delivery, steady (user / sys) | receivers CPU us/delivery, "
        "steady (user / sys) |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        f50, f99, d50, d99 = spread_stats(r.phases[0])
        lines.append(
            f"| {r.target} | {r.listeners} | {fmt(f50)} / {fmt(f99)} | {fmt(d50)} / {fmt(d99)} "
            f"| {per_delivery_us(r.steady_cpu_proxy, r)} "
            f"| {per_delivery_us(r.steady_cpu_receivers, r)} |"
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
        "pgproxy or of the receiving processes (/proc/PID/stat) during the burst / their "
        "deliveries.",
        "",
        CAVEAT.format(cores=os.cpu_count(), procs=args.procs, client=args.client),
    ]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, cluster: PgCluster, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    pg_dsn = cluster.dsn()
    log = tmp / "pgproxy.log"
    for n in args.listeners:
        offset = log.stat().st_size if log.exists() else 0
        proc, port = start_pgproxy(
            tmp, cluster.port, max(n + 100, 1000), args.workers, args.pgproxy_compiled
        )
        try:
            dsn = dsn_for(args.via, "127.0.0.1", tmp, port)
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
        direct = dsn_for(args.via, cluster.host, cluster.socket_dir, cluster.port)
        rows.append(await measure("direct", direct, pg_dsn, args.direct, args, None))
    return rows


def build_receiver(tmp: Path) -> Path:
    """bench/fanout_receiver.c compiled with the system C compiler (``CC``, else cc)."""
    binary = tmp / "fanout_receiver"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("--client c needs a C compiler (cc or gcc, or CC=...)")
    subprocess.run([cc, "-O2", "-o", str(binary), str(RECEIVER_SOURCE)], check=True)
    return binary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.publish:
        publish(args.publish, args.first, args.count, args.interval_ms)
        return 0
    if args.receive:
        uvloop.run(receive_main(args))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile()
    # pgproxy's sockets (it inherits the limit) and each receiving process's share of ours.
    need = max(args.listeners) + 200
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < need:
        print(
            f"warning: RLIMIT_NOFILE {nofile[0]} (hard {nofile[1]}) is below ~{need}; "
            "connections may fail",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-fanout-"))
    cluster = PgCluster(settings={"max_connections": MAX_CONNECTIONS})
    try:
        if args.client == "c":
            args.receiver_binary = build_receiver(tmp)
        cluster.start()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            rows = runner.run(run_all(args, cluster, tmp))
        text = report(rows, args, machine_line(cluster.bindir, psycopg_version()), nofile)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0 if all(r.ok for r in rows) else 1
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
