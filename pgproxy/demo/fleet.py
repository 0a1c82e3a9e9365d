"""One worker process of the seed incident's fleet: ``--workers`` asyncio workers, each with one
connection of its own (as a thread per job in a Sidekiq/GoodJob process would have), that
``LISTEN jobs`` and, on a ``batch:<n>`` notification, claim queued rows one at a time
(``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING id``), announcing each
in the same transaction with ``NOTIFY jobs, 'done:<id>'``. psycopg 3 or asyncpg, with their
defaults (``--driver``).

Run by ``pgproxy.demo.incident`` as ``python -m pgproxy.demo.fleet``. Protocol on stdout: one
JSON line once every worker tried to connect, one when they are done.

Rule: a worker process counts what it saw and reports it; it never judges (the orchestrator
compares the counts with what should have happened). It ignores SIGINT: a Ctrl-C at the
terminal reaches the whole process group, and the orchestrator stops its workers itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import uvloop

CHANNEL = "jobs"
ROLE = "worker"  # the fleet's role: not a superuser, so reserved slots do not help it
WORKER_APP = "seed-worker"
TOO_MANY = "53300"
CLAIM_SQL = (
    "update jobs set state = 'done', done_by = {p}, done_at = clock_timestamp()"
    " where id = (select id from jobs where state = 'queued' order by id"
    " for update skip locked limit 1) returning id"
)


def expected_payloads(jobs: int, batches: int) -> set[str]:
    """What every worker must receive exactly once: each batch and each job's ``done``."""
    return {f"batch:{b}" for b in range(batches)} | {f"done:{j}" for j in range(1, jobs + 1)}


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
    notification arrived (or ``--timeout``), report again."""
    expected = expected_payloads(args.jobs, args.batches)
    workers = [
        Worker(f"w{args.base + i}", args.dsn, args.driver, expected) for i in range(args.workers)
    ]
    await asyncio.gather(*(w.connect() for w in workers))
    up = [w for w in workers if w.result.connected]
    errors = Counter(w.result.error for w in workers if not w.result.connected)
    print(json.dumps({"connected": len(up), "errors": errors}), flush=True)
    deadline = time.monotonic() + args.timeout
    await asyncio.gather(*(w.run(deadline) for w in up))
    await asyncio.gather(*(w.close() for w in up))
    exact = sum(
        1
        for w in up
        if all(w.result.received[p] == 1 for p in expected) and set(w.result.received) == expected
    )
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


def command(
    dsn: str, driver: str, base: int, workers: int, jobs: int, batches: int, timeout: float
) -> list[str]:
    """The command line of one worker process."""
    return [
        sys.executable,
        "-m",
        "pgproxy.demo.fleet",
        "--dsn",
        dsn,
        "--driver",
        driver,
        "--base",
        str(base),
        "--workers",
        str(workers),
        "--jobs",
        str(jobs),
        "--batches",
        str(batches),
        "--timeout",
        str(timeout),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgproxy.demo.fleet", description=__doc__)
    p.add_argument("--dsn", required=True)
    p.add_argument("--driver", choices=("psycopg", "asyncpg"), default="psycopg")
    p.add_argument("--base", type=int, default=0, help="number of the first worker")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(worker_process(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
