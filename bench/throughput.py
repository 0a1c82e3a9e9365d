"""pgbench throughput and latency: direct PostgreSQL vs PgBouncer vs pgproxy.

Everything runs on this machine: a throwaway cluster, PgBouncer and pgproxy (both in
transaction mode with the same pool size), and pgbench as the client.  The targets are
measured interleaved (direct, pgbouncer, pgproxy, then pgbouncer, pgproxy, direct, ...: each
round starts one target later) so slow drift of the machine (thermal, noisy neighbours,
autovacuum) hits all of them alike; each figure is the median over the rounds.

    .venv/bin/python -m bench.throughput --clients 1,50 --seconds 15 --rounds 3

``--pgproxy-workers 2`` adds the target ``pgproxy-2w``: pgproxy with ``workers = 2`` (the
same total pool size, split between the workers), measured in the same interleaving.  The
"pooler CPU" columns are the user + system time of the pooler's processes during each run
(/proc), as cores and per transaction: on a machine whose cores are all busy, CPU per
transaction, not one process's ceiling, is what decides throughput.

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pgproxy.testing import servers
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import clean_env, free_port, stop_server

REPO = Path(__file__).resolve().parent.parent
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"  # sbin is not always on PATH
TARGETS = ("direct", "pgbouncer", "pgproxy")  # plus "pgproxy-<N>w" for --pgproxy-workers N
# --pgproxy-compiled: the optional mypyc build, as scripts/build-compiled leaves it.
COMPILED_TREE = REPO / "build" / "compiled"
MODES = {"select-only": ["-S"], "tpcb": []}
# Client/server round trips per pgbench transaction: -S is one SELECT; the TPC-B-like
# script is BEGIN, 3 UPDATEs, SELECT, INSERT, END.  Used for "added latency per round trip".
ROUND_TRIPS = {"select-only": 1, "tpcb": 7}
SCALE = 10
DB = "postgres"
# What pgbench itself does before a run unless -n; done here directly on the cluster so
# it is identical (and unmeasured) for every target.
RESET_TPCB = "VACUUM pgbench_branches, pgbench_tellers; TRUNCATE pgbench_history;"
Case = tuple[str, str, int]  # (mode, protocol, clients)
USER = "postgres"


@dataclass
class Sample:
    """One pgbench run: tps without connection time, latency in milliseconds, and the
    pooler's CPU use (user + system, all its processes) in cores (NaN: not measured)."""

    tps: float
    lat_avg: float
    p50: float
    p99: float
    cores: float = math.nan
    error: str = ""  # why pgbench failed against this target (then the figures are NaN)


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of group ``pgid``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp, ...
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    p = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--clients", type=lambda s: [int(c) for c in csv(s)], default=[1, 50])
    p.add_argument("--seconds", type=int, default=15, help="duration of each pgbench run")
    p.add_argument("--modes", type=csv, default=["select-only", "tpcb"], help="select-only,tpcb")
    p.add_argument("--protocol", type=csv, default=["simple", "extended"], help="pgbench -M")
    p.add_argument("--pool-size", type=int, default=20, help="pool size of both poolers")
    p.add_argument("--jobs", type=int, help="pgbench -j (default: min(clients, 2))")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case")
    p.add_argument(
        "--pgproxy-workers",
        type=lambda s: [int(n) for n in csv(s)],
        default=[],
        metavar="N[,N...]",
        help="also measure pgproxy with workers = N (target pgproxy-<N>w)",
    )
    p.add_argument(
        "--pgproxy-compiled",
        action="store_true",
        help="also measure the mypyc build in build/compiled (target pgproxy-compiled; "
        "run scripts/build-compiled first)",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure bench/relay_floor.py (target floor): a bare uvloop transaction "
        "pooler, the ceiling for any Python pooler on this machine",
    )
    p.add_argument(
        "--targets",
        type=csv,
        help="subset of targets to run (direct and pgbouncer are always run: ratios need them)",
    )
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = p.parse_args(argv)
    every = [*TARGETS, *(f"pgproxy-{n}w" for n in args.pgproxy_workers if n > 1)]
    if args.pgproxy_compiled:
        every.append("pgproxy-compiled")
    if args.floor:
        every.append("floor")
        if args.pgproxy_compiled:
            every.append("floor-compiled")
    wanted = args.targets or every
    for target in wanted:
        if target not in every:
            p.error(f"unknown target {target!r} (choose from {', '.join(every)})")
    args.targets = [t for t in every if t in ("direct", "pgbouncer") or t in wanted]
    if args.quick:
        args.clients, args.seconds, args.rounds = [2], 2, 1
        args.modes, args.protocol = ["select-only"], ["simple"]
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for proto in args.protocol:
        # -M prepared keeps named statements per session: PgBouncer 1.18 fails it in
        # transaction mode, which the report shows as such instead of stopping the run.
        if proto not in ("simple", "extended", "prepared"):
            p.error(f"unknown protocol {proto!r} (choose from simple, extended, prepared)")
    return args


def start_server(
    name: str, cmd: list[str], port: int, log: Path, cwd: Path = REPO, timeout: float = 30
) -> subprocess.Popen[bytes]:
    """:func:`pgproxy.testing.servers.start_server` run from this checkout by default, so that
    ``python -m pgproxy`` runs the pgproxy in ``cwd``."""
    return servers.start_server(name, cmd, port, log, cwd, timeout)


def start_pgbouncer(
    tmp: Path,
    pg_port: int,
    settings: Mapping[str, object] | None = None,
    users: str | None = None,
    databases: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """PgBouncer in front of the cluster at ``pg_port`` (every database), in transaction mode
    with trust unless ``settings`` (more or other ``[pgbouncer]`` lines) say otherwise.
    ``users``: the auth_file's text (default: USER without a secret, which trust still needs);
    ``databases``: more ``[databases]`` entries, name -> libpq connection string. Its files in
    ``tmp`` are named by its port, so several may share ``tmp`` (the log:
    :func:`pgbouncer_log`). PgBouncer refuses to run as root, so as root it runs as
    ``postgres`` via runuser, whose PAM session resets the soft open-files limit (1024): it is
    raised back to the hard one, or a storm would wait on PgBouncer's backlog."""
    port = free_port()
    userlist = tmp / f"pgbouncer-{port}.users"
    userlist.write_text(users if users is not None else f'"{USER}" ""\n')
    base = {"listen_addr": "127.0.0.1", "listen_port": port, "unix_socket_dir": "",
            "auth_type": "trust", "auth_file": userlist, "pool_mode": "transaction",
            "log_connections": 0, "log_disconnections": 0,
            "pidfile": tmp / f"pgbouncer-{port}.pid"}  # fmt: skip
    routes = {"*": f"host=127.0.0.1 port={pg_port}", **(databases or {})}
    ini = tmp / f"pgbouncer-{port}.ini"
    ini.write_text(
        "[databases]\n" + "".join(f"{k} = {v}\n" for k, v in routes.items())
        + "\n[pgbouncer]\n"
        + "".join(f"{k} = {v}\n" for k, v in {**base, **(settings or {})}.items())
    )  # fmt: skip
    cmd = ["sh", "-c", 'ulimit -n "$(ulimit -Hn)" && exec "$@"', "sh", PGBOUNCER, str(ini)]
    if os.geteuid() == 0:
        tmp.chmod(0o777)
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return start_server("pgbouncer", cmd, port, pgbouncer_log(tmp, port)), port


def pgbouncer_log(tmp: Path, port: int) -> Path:
    """Where :func:`start_pgbouncer` sends the output of the PgBouncer on ``port``."""
    return tmp / f"pgbouncer-{port}.log"


def pgproxy_tree(compiled: bool) -> Path:
    """Where ``python -m pgproxy`` runs the wanted build: this tree, or the mypyc build in
    COMPILED_TREE (checked to really be compiled)."""
    if not compiled:
        return REPO
    check = [sys.executable, "-c", "import pgproxy; print(pgproxy.compiled())"]
    where = COMPILED_TREE if COMPILED_TREE.is_dir() else REPO
    if subprocess.run(check, cwd=where, capture_output=True).stdout.strip() != b"True":
        raise RuntimeError(f"no compiled pgproxy in {COMPILED_TREE}: run scripts/build-compiled")
    return COMPILED_TREE


def start_pgproxy(
    tmp: Path,
    pg_port: int,
    pool_size: int,
    max_conn: int,
    workers: int = 1,
    compiled: bool = False,
    wrapper: Sequence[str] = (),
    timeout: float = 30,
) -> tuple[subprocess.Popen[bytes], int]:
    """pgproxy; with ``workers`` > 1 the pool size and max_client_conn are totals, split
    between the workers by pgproxy itself. ``compiled``: the build in COMPILED_TREE.
    ``wrapper``: a command that runs pgproxy's (e.g. valgrind and its options; the process
    started is then the wrapper's); ``timeout``: seconds to wait for it to listen."""
    port = free_port()
    name = "pgproxy" if workers == 1 else f"pgproxy-{workers}w"
    cwd = pgproxy_tree(compiled)
    if compiled:
        name = "pgproxy-compiled"
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f'default_pool_size = {pool_size}\nmax_client_conn = {max_conn}\nlog_level = "warning"\n'
        f"workers = {workers}\n"
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
    )
    cmd = [*wrapper, sys.executable, "-m", "pgproxy", "--config", str(config)]
    return start_server(name, cmd, port, tmp / f"{name}.log", cwd, timeout), port


def build_floor(tmp: Path) -> Path:
    """bench/relay_floor.py compiled with mypyc, as the pgproxy-compiled build is, in a tree
    of its own (pgproxy itself comes from the installed package)."""
    tree = tmp / "floor-compiled"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(REPO / "bench" / "relay_floor.py", tree / "bench")
    (tree / "bench" / "__init__.py").write_text("")
    env = {**clean_env(), "MYPYPATH": str(REPO)}
    build = [sys.executable, "-m", "mypyc", "bench/relay_floor.py"]
    proc = subprocess.run(build, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mypyc failed on bench/relay_floor.py:\n{proc.stdout[-3000:]}")
    return tree


def start_relay_floor(
    tmp: Path, pg_port: int, pool_size: int, compiled: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """bench/relay_floor.py: the same pool size, nothing but forwarding."""
    port = free_port()
    name = "floor-compiled" if compiled else "floor"
    cmd = [
        # -c, not -m: a compiled module has no code object for runpy.
        sys.executable, "-c", "from bench.relay_floor import main; main()",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{pg_port}", "--user", USER, "--database", DB,
        "--pool-size", str(pool_size),
    ]  # fmt: skip
    cwd = build_floor(tmp) if compiled else REPO
    return start_server(name, cmd, port, tmp / f"{name}.log", cwd), port


def pgbench(bindir: Path, port: int, *args: str, timeout: float = 600) -> str:
    """Run pgbench; the timeout turns a hung pooler into an error instead of a hang."""
    cmd = [str(bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, *args, DB]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: a latency some transaction actually had."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def run_case(
    bindir: Path,
    port: int,
    args: argparse.Namespace,
    case: Case,
    logdir: Path,
    pooler: int | None = None,
) -> Sample:
    """One pgbench run.  The per-transaction log (-l; third column = latency in us) gives
    the median and p99, which pgbench's summary does not report.  ``pooler``: the process
    group whose CPU time to measure over the run."""
    mode, proto, clients = case
    jobs = min(args.jobs or 2, clients)
    for old in logdir.glob("tx.*"):
        old.unlink()
    cpu_before, started = group_cpu(pooler) if pooler else 0.0, time.monotonic()
    try:
        out = pgbench(
            bindir, port, *MODES[mode], "-n", "-M", proto, "-c", str(clients), "-j", str(jobs),
            "-T", str(args.seconds), "-l", "--log-prefix", str(logdir / "tx"),
            timeout=args.seconds + 60,
        )  # fmt: skip
    except RuntimeError as exc:  # e.g. PgBouncer and -M prepared: report it, keep going
        why = next((ln for ln in str(exc).splitlines() if "ERROR" in ln or "error" in ln), "")
        nan = math.nan
        return Sample(nan, nan, nan, nan, error=why.strip() or str(exc).splitlines()[0])
    cores = (group_cpu(pooler) - cpu_before) / (time.monotonic() - started) if pooler else math.nan
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)[1])
    lat_avg = float(re.search(r"latency average = ([\d.]+) ms", out)[1])
    latencies = sorted(
        int(fields[2]) / 1000
        for f in logdir.glob("tx.*")
        for fields in (line.split() for line in f.read_text().splitlines())
        if len(fields) > 2 and fields[2].isdigit()
    )
    return Sample(tps, lat_avg, percentile(latencies, 0.5), percentile(latencies, 0.99), cores)


def machine_line(bindir: Path, *tools: str) -> str:
    """The machine and software versions for a report; ``tools``: more versions to name."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = found[1] if found else cpu
    postgres = subprocess.run([bindir / "postgres", "--version"], capture_output=True, text=True)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, uvloop {metadata.version('uvloop')}, "
        + "".join(f"{tool}, " for tool in tools)
        + f"{postgres.stdout.strip()}; pgproxy {commit or '?'}"
    )


def pgbouncer_version() -> str:
    out = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0]


def report(
    results: dict[tuple[Case, str], list[Sample]], args: argparse.Namespace, machine: str
) -> str:
    """Markdown: one row per case and target, medians over rounds, tps ratios against the
    other targets, then the latency each pooler adds per round trip at the fewest clients."""

    def med(case, target, field):
        ok = [getattr(s, field) for s in results[case, target] if not s.error]
        return statistics.median(ok) if ok else math.nan

    def spread(case, target):
        tps = [s.tps for s in results[case, target] if not s.error]
        if not tps:
            return "-"
        return f"{(max(tps) - min(tps)) / statistics.median(tps) * 100:.0f}%"

    def failure(case, target):
        errors = [s.error for s in results[case, target] if s.error]
        return errors[0] if errors else ""

    cases = list(dict.fromkeys(case for case, _ in results))
    lines = [
        f"Machine: {machine}",
        "",
        f"pgbench -s {SCALE}, {args.seconds} s per run, {args.rounds} interleaved round(s) "
        "(the order rotated by one target each round), "
        f"pool size {args.pool_size} (transaction mode; pgproxy-<N>w: N workers sharing that "
        "total); medians over rounds.",
        "",
        "| mode | protocol | clients | target | tps | tps spread | tps / direct "
        "| tps / pgbouncer | lat avg ms | p50 ms | p99 ms | pooler CPU cores | pooler CPU us/tx |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        for target in args.targets:
            tps = med(case, target, "tps")
            if math.isnan(tps):
                why = failure(case, target).replace("|", "/")
                lines.append(
                    f"| {case[0]} | {case[1]} | {case[2]} | {target} | **fails**: {why} "
                    + "| - " * 8
                    + "|"
                )
                continue
            cores = med(case, target, "cores")
            cpu = "- | -" if math.isnan(cores) else f"{cores:.2f} | {cores / tps * 1e6:.0f}"
            lines.append(
                f"| {case[0]} | {case[1]} | {case[2]} | {target} | {tps:.0f} "
                f"| {spread(case, target)} | {tps / med(case, 'direct', 'tps'):.2f} "
                f"| {tps / med(case, 'pgbouncer', 'tps'):.2f} | {med(case, target, 'lat_avg'):.3f} "
                f"| {med(case, target, 'p50'):.3f} | {med(case, target, 'p99'):.3f} | {cpu} |"
            )
    fewest = min(c[2] for c in cases)
    ours = [t for t in args.targets if t.startswith(("pgproxy", "floor"))]
    lines += [
        "",
        f"Added latency per round trip at {fewest} client(s): in each round, a target's median "
        "transaction latency minus direct's in the same round, divided by round trips per "
        "transaction; the median of that over rounds (pairing within a round cancels the "
        "machine's drift between rounds). Ratio = that median / PgBouncer's; in brackets the "
        "range of the per-round ratios.",
        "",
        "| mode | protocol | pgbouncer +us | "
        + " | ".join(f"{t} +us | {t} / pgbouncer" for t in ours)
        + " |",
        "|---|---|---:|" + "---:|---:|" * len(ours),
    ]
    for case in (c for c in cases if c[2] == fewest):
        added = {t: added_per_round(results, case, t) for t in ("pgbouncer", *ours)}
        base = added["pgbouncer"]
        base_med = _median_of_valid(base)
        cells = [f"{case[0]} | {case[1]} | {base_med:.1f}"]
        for t in ours:
            mine = _median_of_valid(added[t])
            ratio = mine / base_med if base_med > 0 else math.nan
            per_round = [a / b for a, b in zip(added[t], base, strict=True) if b > 0]
            span = f" ({min(per_round):.2f}-{max(per_round):.2f})" if per_round else ""
            cells.append(f"{mine:.1f} | {ratio:.2f}{span}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _median_of_valid(values: list[float]) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return statistics.median(valid) if valid else math.nan


def added_per_round(
    results: dict[tuple[Case, str], list[Sample]], case: Case, target: str
) -> list[float]:
    """Per round: ``target``'s median latency minus direct's, in us per round trip (NaN where
    either failed). Rounds are the samples' positions: every target runs once per round."""
    out = []
    for mine, direct in zip(results[case, target], results[case, "direct"], strict=True):
        if mine.error or direct.error:
            out.append(math.nan)
        else:
            out.append((mine.p50 - direct.p50) * 1000 / ROUND_TRIPS[case[0]])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM should clean up like Ctrl-C does: unwind through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cases = [(m, p, c) for m in args.modes for p in args.protocol for c in args.clients]
    max_conn = max(1000, 2 * max(args.clients))
    # Direct runs need a backend per client while every pooler may still hold its pool.
    poolers = len(args.targets) - 1
    max_connections = max(args.clients) + poolers * args.pool_size + 20
    tmp = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")  # pgbouncer (as postgres) writes here
    cluster = PgCluster(settings={"max_connections": max_connections, "shared_buffers": "256MB"})
    servers: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start()
        bindir = cluster.bindir
        print(f"initialising pgbench -s {SCALE} ...", file=sys.stderr)
        pgbench(bindir, cluster.port, "-i", "-q", "-s", str(SCALE))
        bouncer, bouncer_port = start_pgbouncer(
            tmp, cluster.port, {"default_pool_size": args.pool_size, "max_client_conn": max_conn}
        )
        servers.append(bouncer)
        ports = {"direct": cluster.port, "pgbouncer": bouncer_port}
        groups = {"pgbouncer": bouncer.pid}  # start_server gives each pooler its own group
        for target in args.targets:
            if target.startswith("pgproxy"):
                compiled = target == "pgproxy-compiled"
                workers = 1 if target in ("pgproxy", "pgproxy-compiled") else int(target[8:-1])
                proxy, ports[target] = start_pgproxy(
                    tmp, cluster.port, args.pool_size, max_conn, workers, compiled
                )
                servers.append(proxy)
                groups[target] = proxy.pid
            elif target.startswith("floor"):
                relay, ports[target] = start_relay_floor(
                    tmp, cluster.port, args.pool_size, compiled=target == "floor-compiled"
                )
                servers.append(relay)
                groups[target] = relay.pid
        # Warm-up (not measured): fills the poolers' pools and Postgres' buffer cache.
        warm = argparse.Namespace(**{**vars(args), "seconds": 1})
        for target in args.targets:
            run_case(bindir, ports[target], warm, ("select-only", "simple", max(args.clients)), tmp)
        results: dict[tuple[Case, str], list[Sample]] = {}
        for rnd in range(1, args.rounds + 1):
            # Each round starts one target later (A B C, B C A, C A B, ...): no target always
            # runs first or right after another, so position in the round is no bias.
            shift = (rnd - 1) % len(args.targets)
            order = args.targets[shift:] + args.targets[:shift]
            for case in cases:
                for target in order:
                    if case[0] == "tpcb":  # same starting state for every tpcb run
                        cluster.psql(RESET_TPCB)
                    sample = run_case(bindir, ports[target], args, case, tmp, groups.get(target))
                    results.setdefault((case, target), []).append(sample)
                    print(
                        f"[round {rnd}/{args.rounds}] {case[0]} {case[1]} c={case[2]} "
                        f"{target}: {sample.tps:.0f} tps, p50 {sample.p50:.3f} ms, "
                        f"pooler {sample.cores:.2f} cores",
                        file=sys.stderr,
                    )
        text = report(results, args, machine_line(bindir, pgbouncer_version()))
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    finally:
        for proc in reversed(servers):
            stop_server(proc)
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from bench._cli import run

    run(main)
