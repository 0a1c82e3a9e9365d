"""The README's "Reliability" datasheet: every fault scenario of ``bench/faults/`` run against
pgproxy and, where it can run there, PgBouncer 1.18, side by side; the section between the
README's datasheet markers is rewritten with what each did.

    .venv/bin/python -m bench.datasheet            # all scenarios, README rewritten
    .venv/bin/python -m bench.datasheet --print --scenarios storm,hostile

See bench/README.md (and bench/faults/__init__.py for how to add a scenario).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.faults import SCENARIOS
from bench.faults.env import Env, Finding, progress
from bench.throughput import REPO, machine_line, pgbouncer_version
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import raise_nofile

START = "<!-- datasheet:start (python -m bench.datasheet rewrites this part) -->"
END = "<!-- datasheet:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, in order")
    p.add_argument("--quick", action="store_true", help="small runs (the smoke test)")
    p.add_argument("--print", action="store_true", help="print the section, leave the README")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}: choose from {', '.join(SCENARIOS)}")
    return args


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section(findings: list[Finding], minutes: float, machine: str, load: str) -> str:
    lines = [
        START,
        "| scenario | pgproxy | PgBouncer 1.18 |",
        "|---|---|---|",
        *(
            f"| {cell(f.title)}{'' if f.ok else ' **(FAILED)**'} | {cell(f.pgproxy)} "
            f"| {cell(f.pgbouncer)} |"
            for f in findings
        ),
        "",
        f"Measured by `python -m bench.datasheet` ({minutes:.0f} min), both poolers in the same "
        f"run; {machine}; load average at the start {load} (other work shared the machine).",
        END,
    ]
    return "\n".join(lines)


def rewrite(readme: Path, text: str) -> None:
    old = readme.read_text()
    head, found, rest = old.partition(START)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise SystemExit(f"{readme}: no datasheet markers ({START} ... {END})")
    readme.write_text(head + text + tail)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-datasheet-"))
    cluster = PgCluster(settings={"max_connections": 200})
    started = time.monotonic()
    findings: list[Finding] = []
    try:
        cluster.start()
        for name in args.scenarios:
            scenario = importlib.import_module(f"bench.faults.{name}")
            env = Env(cluster, tmp, args.quick)
            t0 = time.monotonic()
            try:
                findings += scenario.run(env)
            finally:
                env.stop_all()
            progress(f"[{name}] done in {time.monotonic() - t0:.0f} s")
        machine = machine_line(cluster.bindir, pgbouncer_version())
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    text = section(findings, (time.monotonic() - started) / 60, machine, load)
    print(text)
    if not args.print:
        rewrite(args.readme, text)
        progress(f"rewrote the datasheet in {args.readme}")
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    from bench._cli import run

    run(main)
