"""Python job queues (procrastinate, pgqueuer) as their users run them: a fleet of workers and
a producer, all through one DSN (the proxy), in one process of their own.

Run as ``python -m tests.frameworks.py_queues --library L --dsn DSN --workers N --jobs J
--gap S``. It installs the library's schema, starts N workers at the library's defaults except
polling (a minute, so only NOTIFY can wake a worker), waits until each one LISTENs, then
enqueues J jobs, one every S seconds, and waits for them to start. It prints one JSON line on
stdout: ``{"ready": workers listening}`` once the workers listen and have run a first job, then,
after a line on stdin, ``{"latency": {job: [seconds from enqueue to each start]}}``.
Everything the libraries log at WARNING or above goes to stderr (the test fails on any of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

POLL_S = 60.0  # polling interval given to every library: longer than any run of this script
READY_TIMEOUT_S = 60.0
LAST_JOB_GRACE_S = 10.0  # how long after the last enqueue a missing job is waited for
STOP_TIMEOUT_S = 20.0
WARM_UP = -1  # a job run before the measured ones: by then the workers' startup queries are done

Starts = dict[int, list[float]]


@dataclass
class Fleet:
    """Workers running (``tasks``), each setting its ``ready`` event once it LISTENs."""

    ready: list[asyncio.Event]
    tasks: list[asyncio.Task[Any]]
    enqueue: Callable[[int], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]

    async def listening(self) -> int:
        """How many workers came to LISTEN; a worker that died meanwhile raises its error."""
        everyone = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in self.ready)))
        await asyncio.wait(
            [everyone, *self.tasks], timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        everyone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everyone
        for task in self.tasks:
            if task.done():
                task.result()
        return sum(r.is_set() for r in self.ready)


class Run:
    """What the workers saw: when each job started (it may start twice: that is a failure)."""

    def __init__(self, jobs: int) -> None:
        self.enqueued: dict[int, float] = {}
        self.starts: Starts = defaultdict(list)
        self.jobs = jobs
        self.all_started = asyncio.Event()
        self.warmed_up = asyncio.Event()

    def started(self, job: int) -> None:
        if job == WARM_UP:
            self.warmed_up.set()
            return
        self.starts[job].append(time.monotonic())
        if len(self.starts) == self.jobs:
            self.all_started.set()

    def latency(self) -> dict[int, list[float]]:
        return {
            job: [round(t - self.enqueued.get(job, t), 3) for t in times]
            for job, times in self.starts.items()
        }


async def procrastinate_fleet(dsn: str, workers: int, run: Run) -> Fleet:
    import procrastinate
    import psycopg

    class Connector(procrastinate.PsycopgConnector):
        """The stock connector, telling when its worker's LISTEN connection is in place."""

        def __init__(self, ready: asyncio.Event, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ready = ready

        async def _loop_notify(self, *args: Any, **kwargs: Any) -> None:
            self.ready.set()
            await super()._loop_notify(*args, **kwargs)

    def make_app(ready: asyncio.Event) -> procrastinate.App:
        app = procrastinate.App(connector=Connector(ready, conninfo=dsn))

        @app.task(name="work")
        async def work(job: int) -> None:
            run.started(job)

        return app

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        exists = await (await conn.execute("SELECT to_regclass('procrastinate_jobs')")).fetchone()
    producer = make_app(asyncio.Event())
    await producer.open_async()
    if exists is None or exists[0] is None:
        await producer.schema_manager.apply_schema_async()
    ready = [asyncio.Event() for _ in range(workers)]
    apps = [make_app(r) for r in ready]
    tasks = []
    for i, app in enumerate(apps):
        await app.open_async()
        tasks.append(
            asyncio.create_task(
                app.run_worker_async(
                    name=f"worker-{i}",
                    fetch_job_polling_interval=POLL_S,
                    install_signal_handlers=False,
                )
            )
        )

    async def enqueue(job: int) -> None:
        await producer.tasks["work"].defer_async(job=job)

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), STOP_TIMEOUT_S)
        for app in [*apps, producer]:
            await app.close_async()

    return Fleet(ready, tasks, enqueue, stop)


async def pgqueuer_fleet(dsn: str, workers: int, run: Run) -> Fleet:
    import asyncpg
    from pgqueuer import QueueManager
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries

    class Driver(AsyncpgDriver):
        """The stock driver, telling when its worker LISTENs."""

        def __init__(self, conn: Any, ready: asyncio.Event) -> None:
            super().__init__(conn)
            self.ready = ready

        async def add_listener(self, *args: Any, **kwargs: Any) -> None:
            await super().add_listener(*args, **kwargs)
            self.ready.set()

    producer = Queries(AsyncpgDriver(await asyncpg.connect(dsn)))
    if not await producer.schema_is_installed():
        await producer.install()
    ready = [asyncio.Event() for _ in range(workers)]
    managers = []
    for r in ready:
        qm = QueueManager(Queries(Driver(await asyncpg.connect(dsn), r)))

        @qm.entrypoint("work")
        async def work(job: Job) -> None:
            run.started(int(job.payload or b"-1"))

        managers.append(qm)
    tasks = [
        asyncio.create_task(qm.run(dequeue_timeout=timedelta(seconds=POLL_S))) for qm in managers
    ]

    async def enqueue(job: int) -> None:
        await producer.enqueue("work", str(job).encode())

    async def stop() -> None:
        for qm in managers:
            qm.shutdown.set()
        await asyncio.wait_for(asyncio.gather(*tasks), STOP_TIMEOUT_S)

    return Fleet(ready, tasks, enqueue, stop)


FLEETS = {"procrastinate": procrastinate_fleet, "pgqueuer": pgqueuer_fleet}


async def main(library: str, dsn: str, workers: int, jobs: int, gap: float) -> dict[str, Any]:
    run = Run(jobs)
    fleet = await FLEETS[library](dsn, workers, run)
    listening = await fleet.listening()
    if listening == workers:
        await fleet.enqueue(WARM_UP)
        await asyncio.wait_for(run.warmed_up.wait(), READY_TIMEOUT_S)
    # Ready: the test may start several fleets and let them all go at once.
    print(json.dumps({"ready": listening}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if listening == workers:
        for job in range(jobs):
            run.enqueued[job] = time.monotonic()
            await fleet.enqueue(job)
            await asyncio.sleep(gap)  # paces the producer: jobs arrive while workers are idle
        try:
            await asyncio.wait_for(run.all_started.wait(), LAST_JOB_GRACE_S)
        except TimeoutError:
            pass  # reported below as missing jobs
    await fleet.stop()
    return {"latency": run.latency()}


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", choices=sorted(FLEETS), required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--gap", type=float, default=0.2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(main(args.library, args.dsn, args.workers, args.jobs, args.gap))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # Through the module's own name: procrastinate warns (rightly) about apps made in __main__.
    from tests.frameworks import py_queues

    py_queues.cli()
