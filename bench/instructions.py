"""User-space instructions per pgbench -S transaction in the pgproxy process (valgrind callgrind).

The one figure of pgproxy's CPU cost that other load on the machine does not move: pgproxy runs
under ``valgrind --tool=callgrind --instr-atstart=no`` (nothing counted while it starts), an
unmeasured pgbench run warms it up (pool filled, imports and caches done), then
``callgrind_control -i on``, ``pgbench -S -n -M <protocol> -c N -t T``, ``callgrind_control -i
off`` and ``--dump``; the dump's total instructions (Ir, every thread of the process: Python,
uvloop/libuv, libc; not the kernel) divided by the transactions pgbench counted. The clients'
logins fall inside the measured run (pgbench connects when it starts), spread over T
transactions each. A fresh pgproxy for every build and protocol, so a figure does not depend on
what else was measured in the run.

    .venv/bin/python -m bench.instructions --clients 50 --transactions 400 --pgproxy-compiled

Everything is throwaway and on 127.0.0.1: a private cluster (``pgproxy.testing.cluster``,
``pgbench -i -s 1``), pgproxy started as ``bench.throughput`` starts it (transaction mode,
``--pool-size``; ``--pgproxy-compiled`` also measures the mypyc build in build/compiled). Needs
valgrind (``callgrind_control`` comes with it). See bench/README.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.throughput import machine_line, pgbench, start_pgproxy, stop_server
from pgproxy.testing.cluster import PgCluster

PROTOCOLS = ("simple", "extended", "prepared")
BUILDS = {"pgproxy": False, "pgproxy-compiled": True}  # build name -> compiled
# The number of rows does not change pgproxy's work per transaction (the aids only get a digit
# longer), so the smallest pgbench database: loading it takes a second.
SCALE = 1
# Under callgrind with instrumentation off (a JIT without counting) pgproxy starts a few
# times slower than natively.
STARTUP_S = 120


@dataclass
class Sample:
    """One measured pgbench run: what pgbench counted and what callgrind counted."""

    build: str
    protocol: str
    transactions: int
    instructions: int
    seconds: float

    @property
    def per_tx(self) -> float:
        return self.instructions / self.transactions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    p = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n")[0]
    )
    p.add_argument("--protocol", type=csv, default=list(PROTOCOLS), help="pgbench -M (list)")
    p.add_argument("--clients", type=int, default=50, help="pgbench -c")
    p.add_argument("--transactions", type=int, default=400, help="pgbench -t (per client)")
    p.add_argument(
        "--warmup", type=int, default=50, help="unmeasured transactions per client first"
    )
    p.add_argument("--jobs", type=int, help="pgbench -j (default: min(clients, 2))")
    p.add_argument("--pool-size", type=int, default=20, help="pgproxy default_pool_size")
    p.add_argument(
        "--pgproxy-compiled",
        action="store_true",
        help="also measure the mypyc build in build/compiled (run scripts/build-compiled first)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds one measured pgbench run may take"
    )
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    for proto in args.protocol:
        if proto not in PROTOCOLS:
            p.error(f"unknown protocol {proto!r} (choose from {', '.join(PROTOCOLS)})")
    if min(args.clients, args.transactions, args.pool_size) < 1 or args.warmup < 0:
        p.error("counts must be positive")
    args.builds = ["pgproxy", "pgproxy-compiled"] if args.pgproxy_compiled else ["pgproxy"]
    return args


def valgrind_tools() -> tuple[str, str]:
    """valgrind and callgrind_control, or a RuntimeError that says how to get them."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise RuntimeError("valgrind not installed (apt-get install valgrind)")
    return valgrind, control


def callgrind_control(pid: int, *args: str) -> str:
    """One request to the callgrind process ``pid`` (through vgdb; waits for its answer)."""
    cmd = [valgrind_tools()[1], *args, str(pid)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def dump_total(path: Path) -> int:
    """The instructions in a callgrind dump: its ``totals:`` line (``summary:`` if none)."""
    text = path.read_text()
    found = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(
        r"^summary:\s+(\d+)", text, re.M
    )
    if found is None:
        raise RuntimeError(f"no totals in callgrind dump {path}")
    return int(found[1])


def transactions_done(out: str) -> int:
    found = re.search(r"number of transactions actually processed: (\d+)", out)
    if found is None:
        raise RuntimeError(f"no transaction count in pgbench's output:\n{out}")
    return int(found[1])


def measure(
    bindir: Path, cluster_port: int, tmp: Path, build: str, protocol: str, args: argparse.Namespace
) -> Sample:
    """A fresh pgproxy of ``build`` under callgrind; warm-up, then one counted pgbench run."""
    outdir = tmp / f"callgrind-{build}-{protocol}"
    outdir.mkdir()
    wrapper = [
        valgrind_tools()[0], "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={outdir}/callgrind.out", f"--log-file={outdir}/valgrind.log",
    ]  # fmt: skip
    max_conn = max(1000, 2 * args.clients)
    proc, port = start_pgproxy(
        tmp, cluster_port, args.pool_size, max_conn,
        compiled=BUILDS[build], wrapper=wrapper, timeout=STARTUP_S,
    )  # fmt: skip
    try:
        jobs = str(min(args.jobs or 2, args.clients))
        run = ["-S", "-n", "-M", protocol, "-c", str(args.clients), "-j", jobs]
        if args.warmup:
            pgbench(bindir, port, *run, "-t", str(args.warmup), timeout=args.timeout)
        callgrind_control(proc.pid, "--zero")
        callgrind_control(proc.pid, "--instr=on")
        started = time.monotonic()
        out = pgbench(bindir, port, *run, "-t", str(args.transactions), timeout=args.timeout)
        seconds = time.monotonic() - started
        callgrind_control(proc.pid, "--instr=off")
        before = set(outdir.glob("callgrind.out*"))
        callgrind_control(proc.pid, f"--dump={build}-{protocol}")
        dumps = set(outdir.glob("callgrind.out*")) - before
        if len(dumps) != 1:
            raise RuntimeError(f"expected one new callgrind dump in {outdir}, got {dumps}")
        instructions = dump_total(dumps.pop())
    finally:
        stop_server(proc)
    done = transactions_done(out)
    if done != args.clients * args.transactions:
        raise RuntimeError(f"pgbench ran {done} of {args.clients * args.transactions}:\n{out}")
    return Sample(build, protocol, done, instructions, seconds)


def report(samples: list[Sample], args: argparse.Namespace, machine: str) -> str:
    """Markdown: instructions per transaction, one row per build, one column per protocol;
    then the raw counts."""
    by = {(s.build, s.protocol): s for s in samples}
    lines = [
        f"Machine: {machine}",
        "",
        f"User-space instructions (callgrind Ir, all threads) of the pgproxy process per "
        f"transaction of `pgbench -S -n -M <protocol> -c {args.clients} -t "
        f"{args.transactions}` (scale {SCALE}), pool size {args.pool_size}, transaction mode; "
        f"counted after {args.warmup} unmeasured transactions per client on the same pgproxy, "
        "including the clients' logins; a fresh pgproxy per row and protocol. Repeatable to "
        "about 1%: other load on the machine does not change it.",
        "",
        "| build | " + " | ".join(args.protocol) + " |",
        "|---|" + "---:|" * len(args.protocol),
    ]
    for build in args.builds:
        cells = [f"{by[build, p].per_tx:,.0f}" for p in args.protocol]
        lines.append(f"| {build} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| build | protocol | transactions | instructions | wall s (under callgrind) |",
        "|---|---|---:|---:|---:|",
    ]
    for s in samples:
        lines.append(
            f"| {s.build} | {s.protocol} | {s.transactions} | {s.instructions:,} "
            f"| {s.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    valgrind = valgrind_tools()[0]
    # SIGTERM should clean up like Ctrl-C does: unwind through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-instr-"))
    cluster = PgCluster(settings={"max_connections": args.pool_size + 20})
    try:
        cluster.start()
        bindir = cluster.bindir
        print(f"initialising pgbench -s {SCALE} ...", file=sys.stderr)
        pgbench(bindir, cluster.port, "-i", "-q", "-s", str(SCALE))
        samples = []
        for build in args.builds:
            for protocol in args.protocol:
                print(f"[{build} {protocol}] under callgrind ...", file=sys.stderr)
                sample = measure(bindir, cluster.port, tmp, build, protocol, args)
                samples.append(sample)
                print(
                    f"[{build} {protocol}] {sample.per_tx:,.0f} instructions per transaction "
                    f"({sample.transactions} transactions, {sample.seconds:.1f} s)",
                    file=sys.stderr,
                )
        version = subprocess.run([valgrind, "--version"], capture_output=True, text=True)
        text = report(samples, args, machine_line(bindir, version.stdout.strip()))
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
