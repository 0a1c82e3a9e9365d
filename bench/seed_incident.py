"""The seed incident: a job-queue fleet that LISTENs runs PostgreSQL out of connections.

A simulated worker fleet (``--processes`` x ``--workers`` asyncio workers, each with one
connection of its own, as a thread per job in a Sidekiq/GoodJob process would have) where
every worker ``LISTEN jobs`` and runs short jobs: on a ``batch:<n>`` notification it claims
queued rows one at a time (``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)
RETURNING id``) and, in the same transaction, ``NOTIFY jobs, 'done:<id>'``.  Half the worker
processes use psycopg 3, half asyncpg (``--driver``).  A producer enqueues ``--jobs`` rows in
``--batches`` transactions, each ending with a ``batch:<n>`` notification.

Phase 1 connects the fleet straight to a throwaway PostgreSQL with ``max_connections`` 100:
part of it fails with 53300 "sorry, too many clients already", and so does any new connection
(the web app) while the fleet is up.  Phase 2 runs the same fleet through pgproxy (transaction
mode, a pool of ``--pool-size``): every worker connects, every job runs once, every worker
gets every notification exactly once, and PostgreSQL sees one ``pgproxy-listener`` backend
plus at most pool-size pooled ones.

    .venv/bin/python -m bench.seed_incident

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import uvloop

from bench.fanout import psycopg_version, raise_nofile
from bench.throughput import clean_env, free_port, machine_line, start_server, stop_server
from pgproxy.testing.cluster import PgCluster

REPO = Path(__file__).resolve().parent.parent
CHANNEL = "jobs"
ROLE = "worker"  # the fleet's role: not a superuser, so reserved slots do not help it
WORKER_APP = "seed-worker"
PRODUCER_APP = "seed-producer"
MONITOR_APP = "seed-monitor"
TOO_MANY = "53300"
OK_LINE = "pgproxy: every job ran once and every worker got every notification exactly once"
CLAIM_SQL = (
    "update jobs set state = 'done', done_by = {p}, done_at = clock_timestamp()"
    " where id = (select id from jobs where state = 'queued' order by id"
    " for update skip locked limit 1) returning id"
)
SETUP_SQL = f"""
create role {ROLE} login;
create table jobs (
    id bigserial primary key,
    payload text not null,
    state text not null default 'queued',
    done_by text,
    done_at timestamptz
);
grant all on jobs to {ROLE};
grant all on sequence jobs_id_seq to {ROLE};
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.seed_incident", description=__doc__.split("\n")[0]
    )
    p.add_argument("--processes", type=int, default=8, help="worker processes")
    p.add_argument("--workers", type=int, default=25, help="workers (connections) per process")
    p.add_argument("--jobs", type=int, default=400, help="jobs enqueued")
    p.add_argument("--batches", type=int, default=4, help="enqueue transactions (one NOTIFY each)")
    p.add_argument("--pool-size", type=int, default=20, help="pgproxy pool size")
    p.add_argument("--max-connections", type=int, default=100, help="PostgreSQL max_connections")
    p.add_argument(
        "--driver",
        choices=("mixed", "psycopg", "asyncpg"),
        default="mixed",
        help="mixed: even processes psycopg 3, odd ones asyncpg",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="max seconds per phase run")
    p.add_argument("--out", type=Path, help="also write the markdown summary to this file")
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    # Internal: one worker process (see worker_main()).
    p.add_argument("--worker-dsn", help=argparse.SUPPRESS)
    p.add_argument("--worker-driver", default="psycopg", help=argparse.SUPPRESS)
    p.add_argument("--worker-base", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.processes, args.workers, args.jobs, args.batches = 2, 15, 40, 2
        args.pool_size, args.max_connections = 5, 20
    if min(args.processes, args.workers, args.jobs, args.batches, args.pool_size) < 1:
        p.error("counts must be positive")
    if args.pool_size + 5 > args.max_connections:
        p.error("--pool-size must leave room under --max-connections")
    return args


# --- one worker process ----------------------------------------------------------------------


def classify(exc: BaseException) -> str:
    """A short reason for a failed connection: the SQLSTATE where the driver says it."""
    state = getattr(exc, "sqlstate", None)
    text = str(exc)
    fatal = re.search(r"FATAL:\s+(.*)", text)
    message = (fatal[1] if fatal else text.splitlines()[0] if text else "").strip()
    if state == TOO_MANY or "too many clients" in text or "connection slots are reserved" in text:
        state = TOO_MANY
    if state:
        return f"{state} {message[:90]}"
    return f"{type(exc).__name__}: {message[:90]}"


@dataclass
class WorkerResult:
    connected: bool
    error: str = ""
    received: Counter[str] = field(default_factory=Counter)
    jobs: list[int] = field(default_factory=list)
    complete_ns: int = 0  # monotonic time the last expected notification arrived
    run_error: str = ""


class Worker:
    """One worker: its own connection, LISTENing on ``jobs``, claiming jobs when told.

    Notifications are collected from a callback (asyncpg) or psycopg's ``notifies()``, which
    also returns those that arrived while a job's transaction ran.
    """

    def __init__(self, name: str, dsn: str, driver: str, expected: set[str]) -> None:
        self.name = name
        self.dsn = dsn
        self.driver = driver
        self.expected = expected
        self.result = WorkerResult(connected=False)
        self._pg: psycopg.AsyncConnection[Any] | None = None
        self._apg: asyncpg.Connection | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._claim = False

    async def connect(self) -> None:
        try:
            if self.driver == "psycopg":
                self._pg = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, application_name=WORKER_APP, connect_timeout=20
                )
                await self._pg.execute(f"LISTEN {CHANNEL}")
            else:
                self._apg = await asyncpg.connect(
                    self.dsn, timeout=20, server_settings={"application_name": WORKER_APP}
                )
                await self._apg.add_listener(CHANNEL, self._on_notify)
        except Exception as exc:  # every failure is counted, not raised
            self.result.error = classify(exc)
            await self.close()
            return
        self.result.connected = True

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self._queue.put_nowait(str(payload))

    def _note(self, payload: str) -> None:
        r = self.result
        r.received[payload] += 1
        if payload.startswith("batch:"):
            self._claim = True
        if not r.complete_ns and self.expected.issubset(r.received):
            r.complete_ns = time.monotonic_ns()

    async def _wait(self, timeout: float) -> None:
        """Take the notifications that are there, or wait up to ``timeout`` for one."""
        if self._pg is not None:
            async for note in self._pg.notifies(timeout=timeout, stop_after=1):
                self._note(note.payload)
            return
        with contextlib.suppress(TimeoutError):
            self._note(await asyncio.wait_for(self._queue.get(), timeout))
        while not self._queue.empty():
            self._note(self._queue.get_nowait())

    async def _claim_one(self) -> int | None:
        """One job: claim a row and announce it, in one transaction."""
        if self._pg is not None:
            async with self._pg.transaction():
                cur = await self._pg.execute(CLAIM_SQL.format(p="%s"), (self.name,))
                row = await cur.fetchone()
                if row is not None:
                    await self._pg.execute("select pg_notify(%s, %s)", (CHANNEL, f"done:{row[0]}"))
            return None if row is None else int(row[0])
        assert self._apg is not None
        async with self._apg.transaction():
            job = await self._apg.fetchval(CLAIM_SQL.format(p="$1"), self.name)
            if job is not None:
                await self._apg.execute("select pg_notify($1, $2)", CHANNEL, f"done:{job}")
        return None if job is None else int(job)

    async def run(self, deadline: float) -> None:
        try:
            while not self.result.complete_ns and time.monotonic() < deadline:
                await self._wait(min(0.5, max(0.0, deadline - time.monotonic())))
                while self._claim:
                    job = await self._claim_one()
                    if job is None:
                        self._claim = False
                    else:
                        self.result.jobs.append(job)
            await self._wait(0.3)  # a duplicate would arrive now
            if self._apg is not None:
                await asyncio.sleep(0.3)
                await self._wait(0)
        except Exception as exc:  # a worker dying mid-run is a finding
            self.result.run_error = classify(exc)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._pg is not None:
                await self._pg.close()
            if self._apg is not None:
                await self._apg.close(timeout=5)


async def worker_process(args: argparse.Namespace) -> None:
    """Connect ``--workers`` workers at once, report, run jobs until every expected
    notification arrived (or ``--timeout``), report again.  Protocol on stdout: one JSON
    line after connecting, one at the end."""
    expected = {f"batch:{b}" for b in range(args.batches)}
    expected |= {f"done:{j}" for j in range(1, args.jobs + 1)}
    workers = [
        Worker(f"w{args.worker_base + i}", args.worker_dsn, args.worker_driver, expected)
        for i in range(args.workers)
    ]
    await asyncio.gather(*(w.connect() for w in workers))
    up = [w for w in workers if w.result.connected]
    errors = Counter(w.result.error for w in workers if not w.result.connected)
    print(json.dumps({"connected": len(up), "errors": errors}), flush=True)
    deadline = time.monotonic() + args.timeout
    await asyncio.gather(*(w.run(deadline) for w in up))
    await asyncio.gather(*(w.close() for w in up))
    exact = sum(1 for w in up if all(w.result.received[p] == 1 for p in expected)
                and set(w.result.received) == expected)  # fmt: skip
    print(
        json.dumps(
            {
                "exact": exact,
                "missing": sum(len(expected - set(w.result.received)) for w in up),
                "duplicates": sum(c - 1 for w in up for c in w.result.received.values() if c > 1),
                "unexpected": sum(len(set(w.result.received) - expected) for w in up),
                "deliveries": sum(w.result.received.total() for w in up),
                "jobs": [j for w in up for j in w.result.jobs],
                "complete_ns": max((w.result.complete_ns for w in up), default=0),
                "incomplete": sum(1 for w in up if not w.result.complete_ns),
                "run_errors": Counter(w.result.run_error for w in up if w.result.run_error),
            }
        ),
        flush=True,
    )


# --- the orchestrator ------------------------------------------------------------------------


@dataclass
class Phase:
    target: str
    workers: int
    connected: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    probe: str = ""  # a new connection while the fleet is up: "ok" or the error
    producer: str = "ok"
    jobs_run: int = 0
    jobs_done_in_db: int = 0
    jobs_duplicated: int = 0
    exact: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0
    incomplete: int = 0
    deliveries: int = 0
    run_errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    peak: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


class Monitor:
    """Polls pg_stat_activity (its own superuser connection) and keeps peak counts:
    ``listener`` (pgproxy-listener backends), ``fleet`` (the role's other backends: the
    workers' and producer's own directly, pgproxy's pooled servers through it), ``all``."""

    QUERY = (
        "select count(*) filter (where application_name = 'pgproxy-listener'),"
        " count(*) filter (where application_name <> 'pgproxy-listener' and usename = %s),"
        " count(*) from pg_stat_activity where backend_type = 'client backend'"
        " and pid <> pg_backend_pid()"
    )

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.peak = {"listener": 0, "fleet": 0, "all": 0}
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        cur = await self.conn.execute(self.QUERY, (ROLE,))
        row = await cur.fetchone()
        assert row is not None
        for key, value in zip(("listener", "fleet", "all"), row, strict=True):
            self.peak[key] = max(self.peak[key], int(value))

    async def _loop(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict[str, int]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sample()
        return dict(self.peak)


async def connect_error(dsn: str) -> str:
    """Try a fresh connection, as a web request would: "ok" or why it failed."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10)
    except Exception as exc:
        return classify(exc)
    async with conn:
        await conn.execute("select 1")
    return "ok"


async def read_json(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise RuntimeError(f"worker process {proc.pid} exited early (rc={await proc.wait()})")
    data: dict[str, Any] = json.loads(line)
    return data


async def run_phase(target: str, dsn: str, admin_dsn: str, args: argparse.Namespace) -> Phase:
    """Start the fleet against ``dsn``, enqueue the jobs, collect and check the results."""
    phase = Phase(target, args.processes * args.workers)
    async with await psycopg.AsyncConnection.connect(
        admin_dsn, autocommit=True, application_name=MONITOR_APP
    ) as admin:
        await admin.execute("truncate jobs restart identity")
        await wait_for_no_fleet(admin)
        producer = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=PRODUCER_APP
        )
        monitor = Monitor(admin)
        monitor.start()
        procs: list[asyncio.subprocess.Process] = []
        try:
            print(f"[{target}] starting {phase.workers} workers ...", file=sys.stderr)
            for i in range(args.processes):
                driver = args.driver
                if driver == "mixed":
                    driver = "psycopg" if i % 2 == 0 else "asyncpg"
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.seed_incident", "--worker-dsn", dsn,
                    "--worker-driver", driver, "--worker-base", str(i * args.workers),
                    "--workers", str(args.workers), "--jobs", str(args.jobs),
                    "--batches", str(args.batches), "--timeout", str(args.timeout),
                    cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                )  # fmt: skip
                procs.append(proc)
            for proc in procs:
                ready = await read_json(proc, 120)
                phase.connected += ready["connected"]
                phase.connect_errors.update(ready["errors"])
            phase.probe = await connect_error(dsn)
            print(
                f"[{target}] {phase.connected} connected; enqueueing {args.jobs} jobs",
                file=sys.stderr,
            )
            t0 = time.monotonic_ns()
            per_batch = -(-args.jobs // args.batches)
            for b in range(args.batches):
                n = min(per_batch, args.jobs - b * per_batch)
                async with producer.transaction():
                    await producer.execute(
                        "insert into jobs (payload)"
                        " select 'job ' || g from generate_series(1, %s) g",
                        (n,),
                    )
                    await producer.execute("select pg_notify(%s, %s)", (CHANNEL, f"batch:{b}"))
            jobs: list[int] = []
            complete = 0
            for proc in procs:
                res = await read_json(proc, args.timeout + 60)
                for key in ("exact", "missing", "duplicates", "unexpected", "deliveries",
                            "incomplete"):  # fmt: skip
                    setattr(phase, key, getattr(phase, key) + res[key])
                phase.run_errors.update(res["run_errors"])
                jobs += res["jobs"]
                complete = max(complete, res["complete_ns"])
            phase.seconds = (complete - t0) / 1e9 if complete else float("nan")
            phase.jobs_run = len(set(jobs))
            phase.jobs_duplicated = len(jobs) - len(set(jobs))
        finally:
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 30)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            phase.peak = await monitor.stop()
            await producer.close()
        cur = await admin.execute("select count(*) from jobs where state = 'done'")
        row = await cur.fetchone()
        phase.jobs_done_in_db = int(row[0]) if row else 0
    return phase


async def wait_for_no_fleet(admin: psycopg.AsyncConnection[Any]) -> None:
    """Backends of a previous phase exit asynchronously: wait until they are gone."""
    for _ in range(200):
        cur = await admin.execute(
            "select count(*) from pg_stat_activity where usename = %s", (ROLE,)
        )
        row = await cur.fetchone()
        if row is not None and row[0] == 0:
            return
        await asyncio.sleep(0.05)


def phase_ok(p: Phase, args: argparse.Namespace) -> bool:
    return (
        p.connected == p.workers
        and p.exact == p.connected
        and p.jobs_run == args.jobs
        and p.jobs_done_in_db == args.jobs
        and not p.jobs_duplicated
        and not p.run_errors
    )


def start_pgproxy(tmp: Path, pg_port: int, args: argparse.Namespace) -> tuple[Any, int]:
    port = free_port()
    config = tmp / "pgproxy-seed.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f"default_pool_size = {args.pool_size}\n"
        f"max_client_conn = {args.processes * args.workers + 100}\n"
        f'log_level = "warning"\n'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
    )
    cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
    return start_server("pgproxy", cmd, port, tmp / "pgproxy.log"), port


# --- report ----------------------------------------------------------------------------------


def summary(phases: list[Phase], args: argparse.Namespace, machine: str) -> str:
    per = args.batches + args.jobs

    def workers(p: Phase) -> str:
        return f"{p.connected} of {p.workers}"

    def failed(p: Phase) -> str:
        n = p.workers - p.connected
        if not n:
            return "0"
        reasons = ", ".join(f"{c} x {r}" for r, c in p.connect_errors.most_common(2))
        return f"**{n}** ({reasons})"

    def probe(p: Phase) -> str:
        return "ok" if p.probe == "ok" else f"**refused**: {p.probe}"

    def jobs(p: Phase) -> str:
        dup = f", {p.jobs_duplicated} ran twice" if p.jobs_duplicated else ", each once"
        return f"{p.jobs_done_in_db} of {args.jobs}{dup}"

    def notes(p: Phase) -> str:
        want = p.connected * per
        verdict = (
            "exactly once"
            if p.exact == p.connected
            else f"{p.missing} missing, {p.duplicates} duplicated, {p.unexpected} unexpected"
        )
        return f"{p.deliveries:,} of {want:,} ({p.connected} x {per}), {verdict}"

    def upstream(p: Phase) -> str:
        if p.target == "pgproxy":
            return f"{p.peak['listener']} pgproxy-listener + {p.peak['fleet']} pooled"
        return f"{p.peak['fleet']} (one per connection)"

    def errors(p: Phase) -> str:
        return ", ".join(f"{c} x {r}" for r, c in p.run_errors.items()) or "none"

    rows: list[tuple[str, Callable[[Phase], str]]] = [
        ("workers connected and LISTENing", workers),
        ("workers that could not connect", failed),
        ("a new connection while the fleet is up (the web app)", probe),
        ("jobs run", jobs),
        ("notifications delivered", notes),
        ("errors while running", errors),
        ("upstream backends of the fleet and producer (peak)", upstream),
        ("all client backends on PostgreSQL (peak)", lambda p: str(p.peak["all"])),
        ("enqueue -> last notification at the last worker", lambda p: f"{p.seconds:.2f} s"),
    ]
    head = " | ".join(f"{p.target}" for p in phases)
    lines = [
        f"Machine: {machine}",
        "",
        f"Fleet: {args.processes} processes x {args.workers} workers ({args.driver} drivers), "
        f"each worker one connection that LISTENs on `{CHANNEL}` and runs jobs; {args.jobs} jobs "
        f"in {args.batches} batches; PostgreSQL max_connections {args.max_connections}; "
        f"pgproxy transaction mode, pool size {args.pool_size}.",
        "",
        f"| | {head} |",
        "|---|" + "---|" * len(phases),
    ]
    lines += [f"| {label} | " + " | ".join(fn(p) for p in phases) + " |" for label, fn in rows]
    lines.append("")
    for p in phases:
        if p.target == "direct":
            fell = p.connected < p.workers or p.probe != "ok"
            lines.append(
                "direct: the fleet "
                + ("FELL OVER: " if fell else "fit in max_connections: ")
                + f"{p.workers - p.connected} of {p.workers} workers refused"
                + (", new connections refused" if p.probe != "ok" else "")
                + "."
            )
        elif phase_ok(p, args) and p.peak["listener"] == 1 and p.peak["fleet"] <= args.pool_size:
            lines.append(
                f"{OK_LINE}, using 1 listener + {p.peak['fleet']} pooled "
                f"backends (pool size {args.pool_size})."
            )
        else:
            lines.append("pgproxy: FAILED (see the table)")
        if p.log:
            lines.append(f"pgproxy log: {len(p.log)} warning/error line(s), first: {p.log[0]}")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, cluster: PgCluster, tmp: Path) -> list[Phase]:
    admin = cluster.dsn()
    direct_dsn = f"postgresql://{ROLE}@127.0.0.1:{cluster.port}/postgres"
    phases = [await run_phase("direct", direct_dsn, admin, args)]
    proc, port = start_pgproxy(tmp, cluster.port, args)
    try:
        dsn = f"postgresql://{ROLE}@127.0.0.1:{port}/postgres"
        phases.append(await run_phase("pgproxy", dsn, admin, args))
    except BaseException:
        tail = (tmp / "pgproxy.log").read_text(errors="replace")[-3000:]
        print(f"pgproxy log (tail):\n{tail}", file=sys.stderr)
        raise
    finally:
        stop_server(proc)
    log = (tmp / "pgproxy.log").read_text(errors="replace").splitlines()
    phases[-1].log = [ln for ln in log if " WARNING " in ln or " ERROR " in ln]
    return phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_dsn:
        uvloop.run(worker_process(args))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-seed-"))
    cluster = PgCluster(settings={"max_connections": args.max_connections})
    try:
        cluster.start()
        cluster.psql(SETUP_SQL)
        runner_phases: list[Phase]
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner_phases = runner.run(run_all(args, cluster, tmp))
        text = summary(runner_phases, args, machine_line(cluster.bindir, psycopg_version()))
        print(text)
        if args.out:
            args.out.write_text(text)
        pgproxy = runner_phases[-1]
        return 0 if OK_LINE in text and pgproxy.target == "pgproxy" else 1
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
