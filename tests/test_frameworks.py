"""Real job queues through pgproxy in transaction mode, at their defaults, woken only by NOTIFY.

procrastinate (psycopg 3: a pool plus a LISTEN connection per worker), pgqueuer (asyncpg: one
connection per worker that both LISTENs and queries, with a NOTIFY round-trip health check
every 10 s) and pg-boss (Node, ``useListenNotify``: a LISTEN connection checked with
``pg_listening_channels()``) each run in a process of their own (tests/frameworks/), with
polling set to a minute: a job can start within a second of its enqueue only because the
library's LISTEN heard the NOTIFY through the proxy. Each test asserts what a user of the
library would see: every worker listening, every job started exactly once within a second of
its enqueue, and not one warning or error from the library. Each runs against pgproxy with
``workers = 1`` (in this process) and ``workers = 2`` (a supervisor and two worker processes).

The fleet test runs 100 workers of the three libraries against a cluster of its own with
``max_connections = 40``, which could not hold their some 200 connections directly.
``PGPROXY_TEST_FRAMEWORK_FLEET=1`` with ``-m slow`` runs 200 for 40 jobs each.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster
from tests.conftest import build_config, pg_server_url
from tests.support.proxy_runner import ProxyThread
from tests.test_workers import WORKERS, supervisor_process

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "frameworks" / "node"
START_WITHIN_S = 1.0  # from enqueue to the job running: only a NOTIFY can be that quick
RUN_TIMEOUT_S = 120


class QueueProcess:
    """A queue's process (tests/frameworks/): it reports ``{"ready": n}`` once its workers
    listen, starts enqueueing on :meth:`go`, and ends with ``{"latency": ...}``."""

    def __init__(self, command: list[str], *, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ready(self) -> int:
        """How many workers listen (the process times its own wait out)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.finish()  # raises with the process's exit status and stderr
        return int(json.loads(line)["ready"])

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> Outcome:
        try:
            out, err = self.proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}\n{out}\n{err}"
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        latency = {int(job): times for job, times in report["latency"].items()}
        return Outcome(latency, err)


@dataclass
class Outcome:
    """When each job started (seconds after its enqueue), and the library's stderr."""

    latency: dict[int, list[float]]
    stderr: str

    def assert_served(self, jobs: int) -> None:
        assert self.stderr.strip() == "", f"the library logged:\n{self.stderr}"
        missing = sorted(set(range(jobs)) - set(self.latency))
        assert not missing, f"jobs never started: {missing}"
        twice = {job: t for job, t in self.latency.items() if len(t) != 1}
        assert not twice, f"jobs started more than once: {twice}"
        late = {job: t[0] for job, t in self.latency.items() if t[0] > START_WITHIN_S}
        assert not late, f"jobs started later than {START_WITHIN_S}s after enqueue: {late}"


@dataclass
class Queue:
    """A queue's process to run: its command, how many workers it starts, how many jobs."""

    command: list[str]
    workers: int
    jobs: int
    cwd: Path = ROOT


def run_fleets(queues: dict[str, Queue], *, stagger: float = 0.0) -> None:
    """Start every queue; once all of them listen, let them enqueue, ``stagger`` seconds
    apart (so their enqueues interleave rather than collide); check each."""
    running = {name: QueueProcess(q.command, cwd=q.cwd) for name, q in queues.items()}
    try:
        for name, proc in running.items():
            workers = queues[name].workers
            assert proc.ready() == workers, f"{name}: not all {workers} workers came to LISTEN"
        for proc in running.values():
            proc.go()
            time.sleep(stagger)  # paces the producers, as their own gaps do
        for name, proc in running.items():
            try:
                proc.finish().assert_served(queues[name].jobs)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
    finally:
        for proc in running.values():
            if proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()


def python_queue(
    library: str, dsn: str, *, workers: int = 1, jobs: int = 10, gap: float = 0.2
) -> Queue:
    """procrastinate or pgqueuer (tests/frameworks/py_queues.py)."""
    command = [
        sys.executable,
        "-m",
        "tests.frameworks.py_queues",
        f"--library={library}",
        f"--dsn={dsn}",
        f"--workers={workers}",
        f"--jobs={jobs}",
        f"--gap={gap}",
    ]
    return Queue(command, workers, jobs)


def pgboss_queue(dsn: str, *, workers: int = 1, jobs: int = 10, gap: float = 0.2) -> Queue:
    """pg-boss checking its LISTEN every second (``pg_listening_channels()``), not every 10."""
    command = [
        "node",
        "pgboss_queue.mjs",
        f"--dsn={dsn}",
        f"--workers={workers}",
        f"--jobs={jobs}",
        f"--gap={gap}",
        "--heartbeat-ms=1000",
    ]
    return Queue(command, workers, jobs, cwd=NODE_DIR)


@pytest.fixture(scope="session")
def node_queues() -> None:
    """The Node queues of tests/frameworks/node/package-lock.json (scripts/test installs them;
    installed here if missing)."""
    if not (NODE_DIR / "node_modules" / "pg-boss" / "package.json").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )


@pytest.fixture
def database(pg: PgCluster) -> Iterator[str]:
    """A database of the test's own on the shared cluster (each library installs its schema)."""
    yield from _fresh_database(pg, "frameworks")


def _fresh_database(pg: PgCluster, name: str) -> Iterator[str]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=[1, 2], ids=["workers=1", "workers=2"])
def proxy_dsn(
    request: pytest.FixtureRequest,
    pg: PgCluster,
    database: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[str]:
    """A DSN of ``database`` through pgproxy in transaction mode: in this process
    (``workers = 1``), or as a supervisor with two worker processes (``workers = 2``), where a
    library's clients land on either worker. pgproxy itself must log no warning either (e.g.
    session state it cannot carry)."""
    if request.param == 1:
        with ProxyThread(build_config(pg)) as proxy:
            yield proxy.dsn(dbname=database)
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not warned, f"pgproxy logged: {warned}"
        return
    config = tmp_path / "pgproxy.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:0"\nworkers = {WORKERS}\ndefault_pool_size = 5\n'
        f'[databases.{database}]\nurl = "{pg_server_url(pg)}/{database}"\n'
    )
    with supervisor_process(config) as sup:
        yield sup.dsn(database)
        with sup.changed:
            warned = [line for line in sup.lines if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]
        assert not warned, f"pgproxy logged: {warned}"


@pytest.mark.parametrize("library", ["procrastinate", "pgqueuer"])
def test_python_queue_wakes_on_notify(proxy_dsn: str, library: str) -> None:
    run_fleets({library: python_queue(library, proxy_dsn, workers=2, jobs=10)})


@pytest.mark.usefixtures("node_queues")
def test_pgboss_wakes_on_notify(proxy_dsn: str) -> None:
    """pg-boss's listener check (``SELECT EXISTS (SELECT 1 FROM pg_listening_channels() ...
    WHERE channel = $1)``) must find its channel, or pg-boss reports the registration lost and
    reconnects its listener."""
    run_fleets({"pg-boss": pgboss_queue(proxy_dsn, workers=2, jobs=10)})


def run_fleet(workers: dict[str, int], *, jobs: int, gap: float) -> None:
    """Fleets of each library against a cluster of their own with ``max_connections = 40``,
    through one proxy with a pool of 10. Every NOTIFY wakes every worker of its library (each
    then asks for a job), so ``gap`` must leave the herd time to settle."""
    with PgCluster(settings={"max_connections": "40"}) as cluster:
        database = "fleet"  # gone with the cluster
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        config = build_config(cluster, proxy={"default_pool_size": 10})
        with ProxyThread(config) as proxy:
            dsn = proxy.dsn(dbname=database)
            queues = {
                library: (pgboss_queue if library == "pg-boss" else partial(python_queue, library))(
                    dsn, workers=n, jobs=jobs, gap=gap
                )
                for library, n in workers.items()
            }
            run_fleets(queues, stagger=gap / len(queues))


@pytest.mark.usefixtures("node_queues")
def test_fleet_beyond_max_connections() -> None:
    """100 workers (about 200 client connections) on a server that takes 40."""
    run_fleet({"pgqueuer": 70, "procrastinate": 20, "pg-boss": 10}, jobs=10, gap=0.5)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PGPROXY_TEST_FRAMEWORK_FLEET") != "1",
    reason="a fleet of 200 workers for a minute: PGPROXY_TEST_FRAMEWORK_FLEET=1 runs it",
)
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("node_queues")
def test_big_fleet_beyond_max_connections() -> None:
    run_fleet({"pgqueuer": 140, "procrastinate": 40, "pg-boss": 20}, jobs=40, gap=1.0)
