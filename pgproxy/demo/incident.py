"""The seed incident, replayed: a LISTENing job-queue fleet against PostgreSQL directly, then
through pgproxy, with what each run did (:class:`Phase`) and whether pgproxy's run was clean.

Owns one phase (worker processes from ``pgproxy.demo.fleet``, a producer that enqueues the
jobs in batches each ending with a ``batch:<n>`` notification, a monitor that polls
pg_stat_activity), the two phases in order with the pgproxy subprocess between them
(:func:`run_incident`), and the verdict (:func:`proxy_clean`).

Rule: every figure comes from the workers' own counts or from PostgreSQL (pg_stat_activity,
the jobs table), never from pgproxy; every process a phase starts is gone when it returns,
also when it is cancelled (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgproxy.demo.fleet import CHANNEL, ROLE, classify, command
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import clean_env, free_port, start_server, stop_server

PRODUCER_APP = "seed-producer"
MONITOR_APP = "seed-monitor"
LISTENER_APP = "pgproxy-listener"  # what pgproxy's listener connection calls itself
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
# The directory holding the pgproxy package that runs this: children run the same one.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Fleet:
    """The incident's size: ``sizes`` workers in each worker process (even processes use
    psycopg 3, odd ones asyncpg, with ``driver = "mixed"``), ``jobs`` enqueued in
    ``batches`` transactions, and the two servers' limits."""

    sizes: tuple[int, ...]
    jobs: int = 400
    batches: int = 4
    driver: str = "mixed"
    pool_size: int = 20
    max_connections: int = 100
    timeout: float = 60.0  # seconds a phase's workers wait for every notification

    @classmethod
    def of(cls, workers: int, per_process: int = 50, **kw: Any) -> Fleet:
        """``workers`` spread evenly over as few processes as hold ``per_process`` each (at
        least two, so both drivers run)."""
        n = min(workers, max(2, -(-workers // per_process)))
        return cls(tuple(workers // n + (i < workers % n) for i in range(n)), **kw)

    @property
    def workers(self) -> int:
        return sum(self.sizes)

    @property
    def per_worker(self) -> int:
        """Notifications each worker must get exactly once."""
        return self.batches + self.jobs

    def driver_of(self, process: int) -> str:
        if self.driver != "mixed":
            return self.driver
        return "psycopg" if process % 2 == 0 else "asyncpg"


@dataclass
class Phase:
    """One run of the fleet against ``target``: live figures while it runs, results after."""

    target: str
    workers: int
    jobs: int
    stage: str = "starting"
    processes_ready: int = 0
    backends_now: int = 0
    jobs_done_now: int = 0
    connected: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    probe: str = ""  # a new connection while the fleet is up: "ok" or the error
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

    @property
    def refused(self) -> int:
        return sum(self.connect_errors.values())


# Told of every change worth showing: the phase, and a line to keep ("" for a live update).
Report = Callable[[Phase, str], None]


class Monitor:
    """Polls pg_stat_activity (its own superuser connection) and keeps peak counts:
    ``listener`` (pgproxy-listener backends), ``fleet`` (the role's other backends: the
    workers' and producer's own directly, pgproxy's pooled servers through it), ``all``;
    the current backends and jobs done go to the phase, for the progress display."""

    QUERY = (
        f"select count(*) filter (where application_name = '{LISTENER_APP}'),"
        f" count(*) filter (where application_name <> '{LISTENER_APP}' and usename = %s),"
        " count(*), (select count(*) from jobs where state = 'done')"
        " from pg_stat_activity where backend_type = 'client backend'"
        " and pid <> pg_backend_pid()"
    )

    def __init__(self, conn: psycopg.AsyncConnection[Any], phase: Phase, report: Report) -> None:
        self.conn = conn
        self.phase = phase
        self.report = report
        self.peak = {"listener": 0, "fleet": 0, "all": 0}
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        cur = await self.conn.execute(self.QUERY, (ROLE,))
        row = await cur.fetchone()
        assert row is not None
        for key, value in zip(("listener", "fleet", "all"), row[:3], strict=True):
            self.peak[key] = max(self.peak[key], int(value))
        self.phase.backends_now, self.phase.jobs_done_now = int(row[2]), int(row[3])

    async def _loop(self) -> None:
        while True:
            await self.sample()
            self.report(self.phase, "")
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self, final_sample: bool = True) -> dict[str, int]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if final_sample:
            await self.sample()
        return dict(self.peak)


def child_env() -> dict[str, str]:
    """The environment of the worker processes and pgproxy: no PG* variables, and this
    pgproxy first on the path when it does not come from site-packages."""
    env = clean_env()
    if _PACKAGE_ROOT.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = ":".join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


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


async def stop_workers(procs: list[asyncio.subprocess.Process], patience: float) -> None:
    """Wait up to ``patience`` seconds for each worker process to end, then kill it."""
    for proc in procs:
        if proc.returncode is None and patience > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), patience)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _start_fleet(dsn: str, fleet: Fleet) -> list[asyncio.subprocess.Process]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i, size in enumerate(fleet.sizes):
            cmd = command(
                dsn,
                fleet.driver_of(i),
                base=sum(fleet.sizes[:i]),
                workers=size,
                jobs=fleet.jobs,
                batches=fleet.batches,
                timeout=fleet.timeout,
            )
            procs.append(
                await asyncio.create_subprocess_exec(
                    *cmd, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
                )
            )
    except BaseException:
        await stop_workers(procs, 0)
        raise
    return procs


async def _enqueue(producer: psycopg.AsyncConnection[Any], fleet: Fleet) -> None:
    per_batch = -(-fleet.jobs // fleet.batches)
    for b in range(fleet.batches):
        n = min(per_batch, fleet.jobs - b * per_batch)
        async with producer.transaction():
            await producer.execute(
                "insert into jobs (payload) select 'job ' || g from generate_series(1, %s) g",
                (n,),
            )
            await producer.execute("select pg_notify(%s, %s)", (CHANNEL, f"batch:{b}"))


async def _collect(phase: Phase, procs: list[asyncio.subprocess.Process], fleet: Fleet) -> int:
    """Read every worker process's final report into ``phase``; the last completion time."""
    jobs: list[int] = []
    complete = 0
    for proc in procs:
        res = await read_json(proc, fleet.timeout + 60)
        for key in ("exact", "missing", "duplicates", "unexpected", "deliveries", "incomplete"):
            setattr(phase, key, getattr(phase, key) + res[key])
        phase.run_errors.update(res["run_errors"])
        jobs += res["jobs"]
        complete = max(complete, res["complete_ns"])
    phase.jobs_run = len(set(jobs))
    phase.jobs_duplicated = len(jobs) - len(set(jobs))
    return complete


async def run_phase(target: str, dsn: str, admin_dsn: str, fleet: Fleet, report: Report) -> Phase:
    """Start the fleet against ``dsn``, enqueue the jobs, collect and check the results."""
    phase = Phase(target, fleet.workers, fleet.jobs)
    async with await psycopg.AsyncConnection.connect(
        admin_dsn, autocommit=True, application_name=MONITOR_APP
    ) as admin:
        await admin.execute("truncate jobs restart identity")
        await wait_for_no_fleet(admin)
        producer = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=PRODUCER_APP
        )
        monitor = Monitor(admin, phase, report)
        monitor.start()
        procs: list[asyncio.subprocess.Process] = []
        finished = False
        try:
            report(phase, f"starting {phase.workers} workers in {len(fleet.sizes)} processes")
            phase.stage = "connecting"
            procs = await _start_fleet(dsn, fleet)
            for proc in procs:
                ready = await read_json(proc, 120)
                phase.connected += ready["connected"]
                phase.connect_errors.update(ready["errors"])
                phase.processes_ready += 1
                report(phase, "")
            phase.probe = await connect_error(dsn)
            phase.stage = "running"
            report(
                phase,
                f"{phase.connected} connected, {phase.refused} refused; "
                f"enqueueing {fleet.jobs} jobs",
            )
            t0 = time.monotonic_ns()
            await _enqueue(producer, fleet)
            complete = await _collect(phase, procs, fleet)
            phase.seconds = (complete - t0) / 1e9 if complete else float("nan")
            finished = True
        finally:
            await stop_workers(procs, 30 if finished else 0)
            phase.peak = await monitor.stop(final_sample=finished)
            await producer.close()
        cur = await admin.execute("select count(*) from jobs where state = 'done'")
        row = await cur.fetchone()
        phase.jobs_done_in_db = int(row[0]) if row else 0
    phase.stage = "done"
    report(
        phase,
        f"done: {phase.jobs_done_in_db} of {fleet.jobs} jobs, "
        f"{phase.deliveries:,} notifications in {phase.seconds:.2f} s",
    )
    return phase


def start_pgproxy(tmp: Path, pg_port: int, fleet: Fleet) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m pgproxy`` on a free port of 127.0.0.1, transaction mode, in front of the
    cluster; its log goes to ``tmp/pgproxy.log``."""
    port = free_port()
    config = tmp / "pgproxy-seed.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f"default_pool_size = {fleet.pool_size}\n"
        f"max_client_conn = {fleet.workers + 100}\n"
        f'log_level = "warning"\n'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
    )
    cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
    log = tmp / "pgproxy.log"
    return start_server("pgproxy", cmd, port, log, env=child_env()), port


async def run_incident(cluster: PgCluster, tmp: Path, fleet: Fleet, report: Report) -> list[Phase]:
    """Both phases: directly against ``cluster`` (set up with :data:`SETUP_SQL`), then
    through a pgproxy started for it (and stopped after)."""
    admin = cluster.dsn()
    direct_dsn = f"postgresql://{ROLE}@127.0.0.1:{cluster.port}/postgres"
    phases = [await run_phase("direct", direct_dsn, admin, fleet, report)]
    proc, port = start_pgproxy(tmp, cluster.port, fleet)
    log = tmp / "pgproxy.log"
    via = Phase("pgproxy", fleet.workers, fleet.jobs)
    try:
        report(
            via, f"listening on 127.0.0.1:{port} (transaction mode, pool size {fleet.pool_size})"
        )
        dsn = f"postgresql://{ROLE}@127.0.0.1:{port}/postgres"
        phases.append(await run_phase("pgproxy", dsn, admin, fleet, report))
    except Exception:
        tail = log.read_text(errors="replace")[-3000:]
        report(via, f"pgproxy log (tail):\n{tail}")
        raise
    finally:
        stop_server(proc)
    lines = log.read_text(errors="replace").splitlines()
    phases[-1].log = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln]
    return phases


def phase_ok(p: Phase, fleet: Fleet) -> bool:
    """Every worker connected, got every notification exactly once, and every job ran once."""
    return (
        p.connected == p.workers
        and p.exact == p.connected
        and p.jobs_run == fleet.jobs
        and p.jobs_done_in_db == fleet.jobs
        and not p.jobs_duplicated
        and not p.run_errors
    )


def proxy_clean(p: Phase, fleet: Fleet) -> bool:
    """pgproxy's run was clean: :func:`phase_ok`, with one listener backend and at most the
    pool's backends on PostgreSQL."""
    return (
        p.target == "pgproxy"
        and phase_ok(p, fleet)
        and p.peak.get("listener") == 1
        and p.peak.get("fleet", 0) <= fleet.pool_size
    )
