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
