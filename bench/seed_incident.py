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

The fleet, the phases, the verdict and the table are ``pgproxy.demo``'s (``pgproxy demo`` runs
the same incident at one size); this script adds the benchmark's knobs, the machine line and
a markdown report. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import uvloop

from bench.fanout import psycopg_version
from bench.throughput import machine_line
from pgproxy.demo import report
from pgproxy.demo.incident import SETUP_SQL, Fleet, Phase, run_incident
from pgproxy.demo.progress import Progress
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import raise_nofile


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
    args = p.parse_args(argv)
    if args.quick:
        args.processes, args.workers, args.jobs, args.batches = 2, 15, 40, 2
        args.pool_size, args.max_connections = 5, 20
    if min(args.processes, args.workers, args.jobs, args.batches, args.pool_size) < 1:
        p.error("counts must be positive")
    if args.pool_size + 5 > args.max_connections:
        p.error("--pool-size must leave room under --max-connections")
    return args


def fleet_of(args: argparse.Namespace) -> Fleet:
    return Fleet(
        (args.workers,) * args.processes,
        jobs=args.jobs,
        batches=args.batches,
        driver=args.driver,
        pool_size=args.pool_size,
        max_connections=args.max_connections,
        timeout=args.timeout,
    )


def summary(phases: list[Phase], args: argparse.Namespace, machine: str) -> str:
    fleet = fleet_of(args)
    head = [
        f"Machine: {machine}",
        "",
        f"Fleet: {args.processes} processes x {args.workers} workers ({args.driver} drivers), "
        f"each worker one connection that LISTENs on `jobs` and runs jobs; {args.jobs} jobs "
        f"in {args.batches} batches ({fleet.per_worker} notifications per worker); PostgreSQL "
        f"max_connections {args.max_connections}; pgproxy transaction mode, pool size "
        f"{args.pool_size}.",
        "",
    ]
    return "\n".join(head) + "\n" + report.markdown(phases, fleet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    fleet = fleet_of(args)
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-seed-"))
    cluster = PgCluster(settings={"max_connections": args.max_connections})
    progress = Progress(sys.stderr, args.max_connections, live=False)
    try:
        cluster.start()
        cluster.psql(SETUP_SQL)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            phases = runner.run(run_incident(cluster, tmp, fleet, progress))
        text = summary(phases, args, machine_line(cluster.bindir, psycopg_version()))
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0 if report.clean(phases, fleet) else 1
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
