"""Smoke test: ``python -m bench.throughput --quick`` runs end to end.

It keeps the benchmark working (PgBouncer/pgproxy startup, pgbench parsing, report) as
the proxy changes; the figures themselves are not checked, only that all three targets
produced a positive tps.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_quick_benchmark_reports_all_targets() -> None:
    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        pytest.skip("pgbouncer binary not installed (apt-get install pgbouncer)")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    tps = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # | mode | protocol | clients | target | tps | ...
        if len(cells) > 4 and cells[3] in ("direct", "pgbouncer", "pgproxy"):
            tps[cells[3]] = float(cells[4])
    assert set(tps) == {"direct", "pgbouncer", "pgproxy"}, proc.stdout
    assert all(value > 0 for value in tps.values()), tps


@pytest.mark.timeout(150)
def test_quick_fanout_benchmark_delivers_exactly_once() -> None:
    """``python -m bench.fanout --quick``: 20 listeners through pgproxy, 20 + 20 notifications."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fanout", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "pgproxy n=20: exactly-once and in-order: OK at every one of 20 listeners" in (
        proc.stdout
    ), proc.stdout
    assert "| pgproxy | 20 |" in proc.stdout, proc.stdout


def run_bench(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.timeout(150)
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_quick_fanout_over_raw_clients_in_two_processes_delivers_exactly_once(via: str) -> None:
    """``bench.fanout --procs 2 --client raw``: the path the 10,000-listener run takes."""
    proc = run_bench("bench.fanout", "--quick", "--procs", "2", "--client", "raw", "--via", via)
    how = {"tcp": "over TCP loopback", "unix": "over the unix-domain socket"}[via]
    assert f"NotificationResponse via pgproxy.protocol.messages), {how}," in proc.stdout, (
        proc.stdout
    )
    assert "pgproxy n=20: exactly-once and in-order: OK at every one of 20 listeners" in (
        proc.stdout
    ), proc.stdout
    assert "| pgproxy | 20 | 1 | 1 |" in proc.stdout, proc.stdout  # one listener backend


@pytest.mark.timeout(150)
def test_quick_seed_incident_falls_over_directly_and_not_through_pgproxy() -> None:
    """``bench.seed_incident --quick``: 30 workers against max_connections 20."""
    proc = run_bench("bench.seed_incident", "--quick")
    assert "direct: the fleet FELL OVER" in proc.stdout, proc.stdout
    assert (
        "pgproxy: every job ran once and every worker got every notification exactly once, "
        "using 1 listener + " in proc.stdout
    ), proc.stdout
    assert "| jobs run | 40 of 40, each once | 40 of 40, each once |" in proc.stdout, proc.stdout


@pytest.mark.timeout(150)
def test_quick_memory_benchmark_logs_everyone_in_and_traces() -> None:
    """``bench.memory --quick``: 50 idle and LISTENing SCRAM clients, a storm of 50 per
    secret kind, and the tracemalloc breakdown."""
    proc = run_bench("bench.memory", "--quick")
    assert "memory: every client logged in (no login failed in any row)." in proc.stdout
    for row in ("| 50 | idle |", "| 50 | listen |", "| SCRAM verifier | 50 |"):
        assert row in proc.stdout, proc.stdout
    assert "**total** (all lines)" in proc.stdout, proc.stdout


def test_quick_hotpath_benchmark_runs_every_transaction() -> None:
    """bench.hotpath drives real sessions over in-memory transports; it raises if a
    transaction is lost or a reply does not reach its client."""
    from bench import hotpath

    for protocol in ("simple", "extended", "prepared"):
        per_tx = hotpath.run(transactions=300, clients=5, servers=2, protocol=protocol)
        assert per_tx > 0
