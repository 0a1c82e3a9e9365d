"""Smoke tests: every benchmark script runs end to end in its ``--quick`` mode.

They keep the benchmarks working (PgBouncer/pgproxy startup, pgbench parsing, reports) as
the proxy changes; the figures themselves are not checked, only that every target produced
them and that the exactly-once checks pass.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from pgproxy.testing.cluster import PgCluster

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_quick_benchmark_reports_all_targets() -> None:
    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        pytest.skip("pgbouncer binary not installed (apt-get install pgbouncer)")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--quick", "--floor"],
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
        if len(cells) > 4 and cells[3] in ("direct", "pgbouncer", "pgproxy", "floor"):
            tps[cells[3]] = float(cells[4])
    assert set(tps) == {"direct", "pgbouncer", "pgproxy", "floor"}, proc.stdout
    assert all(value > 0 for value in tps.values()), tps


@pytest.mark.timeout(150)
def test_quick_login_benchmark_logs_in_over_each_tls_case() -> None:
    """``python -m bench.logins --quick``: plaintext, SSLRequest and direct TLS logins."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.logins", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rates = {}
    for line in proc.stdout.splitlines():
        words = line.split()
        if len(words) > 3 and words[1] in ("none:", "sslrequest:", "direct:"):
            rates[words[1].rstrip(":")] = float(words[2])
    assert set(rates) == {"none", "sslrequest", "direct"}, proc.stdout
    assert all(rate > 0 for rate in rates.values()), rates


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


@pytest.mark.timeout(90)
@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="valgrind not installed (apt-get install valgrind): bench.instructions runs pgproxy "
    "under callgrind",
)
def test_tiny_instructions_benchmark_counts_a_plausible_figure() -> None:
    """``bench.instructions`` at 2 clients x 20 transactions, simple protocol: pgproxy under
    callgrind, a positive instruction count per transaction of a plausible size (the logins
    are spread over only 20 transactions each, so it is above the 400-transaction figure)."""
    proc = run_bench(
        "bench.instructions", "--clients", "2", "--transactions", "20", "--warmup", "10",
        "--protocol", "simple",
    )  # fmt: skip
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| pgproxy |")]
    assert rows, proc.stdout
    per_tx = float(rows[0].split("|")[2].replace(",", ""))
    # A C pooler needs ~5,000; pgproxy 20,000 (compiled) to 45,000 (pure) at 400 per client.
    assert 5_000 < per_tx < 1_000_000, proc.stdout
    assert "| pgproxy | simple | 40 |" in proc.stdout, proc.stdout


def test_quick_hotpath_benchmark_runs_every_transaction() -> None:
    """bench.hotpath drives real sessions over in-memory transports; it raises if a
    transaction is lost or a reply does not reach its client."""
    from bench import hotpath

    for protocol in ("simple", "extended", "prepared"):
        per_tx = hotpath.run(transactions=300, clients=5, servers=2, protocol=protocol)
        assert per_tx > 0


@pytest.mark.timeout(150)
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_quick_fanout_over_c_receivers_delivers_exactly_once(via: str) -> None:
    """``bench.fanout --client c``: bench/fanout_receiver.c built and used as the listeners."""
    proc = run_bench("bench.fanout", "--quick", "--procs", "2", "--client", "c", "--via", via)
    assert "Each listener: a C epoll loop" in proc.stdout, proc.stdout
    assert "pgproxy n=20: exactly-once and in-order: OK at every one of 20 listeners" in (
        proc.stdout
    ), proc.stdout
    assert "| pgproxy | 20 | 1 | 1 |" in proc.stdout, proc.stdout


def test_c_receiver_reports_a_duplicate_and_a_missing_notification(tmp_path: Path) -> None:
    """The C receiver's exactly-once check can fail: against a fake server that sends
    seq 0, 1, 1 (a duplicate) and 3 (2 missing), it reports the listener as bad, the first
    phase as complete and the second not."""
    from bench.fanout import build_receiver
    from pgproxy.protocol import messages as m

    binary = build_receiver(tmp_path)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def read_message(conn: socket.socket, typed: bool) -> bytes:
        head = conn.recv(5 if typed else 4, socket.MSG_WAITALL)
        length = int.from_bytes(head[-4:], "big")
        return conn.recv(length - 4, socket.MSG_WAITALL) if length > 4 else b""

    def fake_postgres() -> None:
        conn, _ = server.accept()
        with conn:
            read_message(conn, typed=False)  # startup
            conn.sendall(m.authentication_ok() + m.ready_for_query())
            assert read_message(conn, typed=True) == b"LISTEN bench\0"
            conn.sendall(m.command_complete("LISTEN") + m.ready_for_query())
            notes = [
                m.notification_response(7, "bench", f"{seq}:{seq + 1}") for seq in (0, 1, 1, 3)
            ]
            conn.sendall(b"".join(notes))
            conn.recv(1)  # until the receiver closes

    thread = threading.Thread(target=fake_postgres, daemon=True)
    thread.start()
    proc = subprocess.Popen(
        [str(binary), "127.0.0.1", str(port), "1", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "done steady"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        server.close()
    assert result["bad"] == 1
    assert result["problems"] == ["listener 0: 4 received, OUT OF ORDER or duplicated"]
    steady, burst = result["phases"]
    assert steady["complete"] == 2 and steady["sent"] == {"0": 1, "1": 2}
    assert burst["complete"] == 1 and burst["sent"] == {"3": 4}  # seq 2 never came
    assert result["errors"] == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compiled", [False, True], ids=["pure", "compiled"])
def test_relay_floor_pools_transactions(pg: PgCluster, tmp_path: Path, compiled: bool) -> None:
    """bench/relay_floor.py, the ``floor`` target, is a working transaction pooler: three
    clients share one server, a transaction stays on it until COMMIT, and the extended
    protocol (psycopg's parameters) works; the mypyc build of it too."""
    from bench.throughput import start_relay_floor, stop_server

    relay, port = start_relay_floor(tmp_path, pg.port, pool_size=1, compiled=compiled)
    try:
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
        pids = {c.execute("select pg_backend_pid()").fetchone() for c in conns}
        assert len(pids) == 1  # one pooled server behind all three
        first, second = conns[0], conns[1]
        first.execute("begin")
        first.execute("create temp table t (x int) on commit drop")
        first.execute("insert into t values (%s)", (42,))
        assert first.execute("select x from t").fetchone() == (42,)
        first.execute("commit")
        assert second.execute("select %s::int + 1", (1,)).fetchone() == (2,)
        for c in conns:
            c.close()
    finally:
        stop_server(relay)
    log = tmp_path / ("floor-compiled.log" if compiled else "floor.log")
    build = "compiled" if compiled else "pure Python"
    assert f"relay_floor ready ({build})" in log.read_text()


@pytest.mark.timeout(150)
def test_quick_storm_benchmark_reports_both_poolers() -> None:
    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        pytest.skip("pgbouncer binary not installed (apt-get install pgbouncer)")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.storm", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "checks: OK" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| pg")]
    assert [row.split("|")[1].strip() for row in rows] == ["pgproxy", "pgbouncer"]
    assert "53300: " in rows[0] and "08P01: " in rows[1]  # the refusals beyond max_client_conn


@pytest.mark.timeout(150)
def test_quick_datasheet_rewrites_only_its_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    start, end = (
        "<!-- datasheet:start (python -m bench.datasheet rewrites this part) -->",
        ("<!-- datasheet:end -->"),
    )
    readme.write_text(f"# before\n\n{start}\nold table\n{end}\n\n# after\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.datasheet", "--quick", "--scenarios", "listener",
         "--readme", str(readme)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    text = readme.read_text()
    assert text.startswith("# before\n\n" + start) and text.endswith(end + "\n\n# after\n")
    assert "old table" not in text
    assert "| Listener backend killed (10 listeners) | 1 listener backend killed: 10 of 10" in text
