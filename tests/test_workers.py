"""``workers = N``: a supervisor and N SO_REUSEPORT worker processes (pgproxy.workers).

Every test runs pgproxy as a real process. Which worker served a connection is read from its
virtual backend PID (``vpid_owner``), so the tests never guess; what happens inside the
processes is awaited through their log lines, read from the shared stdout as they come.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.app import vpid_owner
from pgproxy.cli import build_arg_parser, config_from_args
from pgproxy.config import ConfigError, parse_config
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from pgproxy.workers.role import per_worker
from tests.conftest import pg_server_url
from tests.support.process import ROOT, ProcessOutput, stop

WORKERS = 2
READY = re.compile(r"\[supervisor\]: worker (\d+) \(pid (\d+)\) ready")


class Supervisor(ProcessOutput):
    """A running ``pgproxy`` with workers; ``lines`` is its output so far (all processes)."""

    def __init__(self, proc: subprocess.Popen[bytes], config: Path) -> None:
        super().__init__(proc)
        self.config = config
        self.port = 0
        self.workers: dict[int, int] = {}  # index -> pid, as last seen ready

    def wait_ready(self, after: int = 0) -> None:
        """Until every worker has reported ready since line ``after``; records their pids."""
        pending = set(range(WORKERS))
        while pending:
            found = self.wait_for(READY.pattern, after)
            with self.changed:
                after = self.lines.index(found.string, after) + 1
            self.workers[int(found[1])] = int(found[2])
            pending.discard(int(found[1]))

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10)


@contextmanager
def supervisor(tmp_path: Path, pg: PgCluster, extra: str = "") -> Iterator[Supervisor]:
    """pgproxy with 2 workers on an ephemeral port (log level debug), stopped afterwards."""
    config = tmp_path / "pgproxy.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:0"\nworkers = {WORKERS}\nlog_level = "debug"\n'
        f"default_pool_size = 4\n{extra}\n"
        f'[databases.postgres]\nurl = "{pg_server_url(pg)}/postgres"\n'
    )
    with supervisor_process(config) as sup:
        yield sup


@contextmanager
def supervisor_process(config: Path) -> Iterator[Supervisor]:
    """``pgproxy --config CONFIG`` (which sets ``workers``), stopped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sup = Supervisor(proc, config)
    seen: set[int] = set()
    try:
        sup.port = int(sup.wait_for(r"starting \d+ workers on 127\.0\.0\.1:(\d+)")[1])
        sup.wait_ready()
        seen.update(sup.workers.values())
        yield sup
        seen.update(sup.workers.values())
    finally:
        stop(proc)
        for pid in seen:  # never leave a worker behind, whatever the test did
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return re.search(r"^State:\s+Z", status, re.MULTILINE) is None


def _wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


def _one_per_worker(
    sup: Supervisor, dbname: str = "postgres"
) -> dict[int, psycopg.Connection[Any]]:
    """A connection served by each worker (the kernel picks; connect until both are hit)."""
    found: dict[int, psycopg.Connection[Any]] = {}
    for _ in range(200):
        conn = sup.connect(dbname)
        owner = vpid_owner(conn.info.backend_pid, WORKERS)
        assert owner is not None, conn.info.backend_pid
        if owner in found:
            conn.close()
            continue
        assert conn.execute("select 1").fetchone() == (1,)
        found[owner] = conn
        if len(found) == WORKERS:
            return found
    raise AssertionError(f"200 connections, all served by worker(s) {sorted(found)}")


@pytest.fixture(scope="module")
def running(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    with supervisor(tmp_path_factory.mktemp("workers"), pg) as sup:
        yield sup


# --------------------------------------------------------------------------- configuration


def test_workers_setting_accepts_counts_and_auto_and_rejects_the_rest(tmp_path: Path) -> None:
    assert parse_config({}).proxy.workers == 1
    assert parse_config({"proxy": {"workers": 3}}).proxy.workers == 3
    assert parse_config({"proxy": {"workers": "auto"}}).proxy.workers == (os.cpu_count() or 1)
    for bad, message in [
        (0, "proxy.workers: must be between 1 and 1024 (got 0)"),
        (True, "proxy.workers: must be an integer (got boolean true)"),
        ("2", "proxy.workers: must be an integer or 'auto' (got string '2')"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config({"proxy": {"workers": bad}})
        assert str(info.value) == message
    parser = build_arg_parser()
    config = tmp_path / "c.toml"
    config.write_text("[proxy]\nworkers = 2\n")
    args = parser.parse_args(["--config", str(config)])
    assert config_from_args(args, env={}).proxy.workers == 2
    assert config_from_args(args, env={"PGPROXY_WORKERS": "3"}).proxy.workers == 3
    with_flag = parser.parse_args(["--config", str(config), "--workers", "4"])
    assert config_from_args(with_flag, env={"PGPROXY_WORKERS": "3"}).proxy.workers == 4
    with pytest.raises(ConfigError, match=r"^PGPROXY_WORKERS: must be an integer or 'auto'"):
        config_from_args(args, env={"PGPROXY_WORKERS": "many"})
    with pytest.raises(ConfigError, match=r"^--workers: must be between 1 and 1024 \(got 0\)"):
        config_from_args(parser.parse_args(["--workers", "0"]), env={})


def test_each_worker_gets_its_share_of_the_sizes() -> None:
    config = parse_config(
        {
            "proxy": {"default_pool_size": 20, "min_pool_size": 1, "max_client_conn": 1001},
            "databases": {
                "a": {"url": "postgresql://h/a", "pool_size": 3, "min_pool_size": 3},
                "b": {"url": "postgresql://h/b", "pool_size": 1},
            },
            "users": {"u": {"pool_size": 7}, "v": {}},
        }
    )
    assert per_worker(config, 1) is config
    shared = per_worker(config, 2)
    assert shared.proxy.default_pool_size == 10  # totals stay what the file says
    assert shared.proxy.min_pool_size == 0  # rounded down: never above the pool size
    assert shared.proxy.max_client_conn == 501  # rounded up: no client refused below the total
    assert shared.databases["a"].pool_size == 1 and shared.databases["a"].min_pool_size == 1
    assert shared.databases["b"].pool_size == 1  # at least one server per worker
    assert shared.users["u"].pool_size == 3 and shared.users["v"].pool_size is None
    assert shared.databases["a"].url == config.databases["a"].url
    assert shared.proxy.workers == config.proxy.workers


# --------------------------------------------------------------------------- serving


def test_connections_are_served_by_every_worker(running: Supervisor) -> None:
    conns = _one_per_worker(running)
    try:
        for owner, conn in conns.items():
            assert conn.execute("select current_database()").fetchone() == ("postgres",)
            assert vpid_owner(conn.info.backend_pid, WORKERS) == owner
    finally:
        for conn in conns.values():
            conn.close()


def _until_sleeping(pg: PgCluster, tag: str) -> None:
    """Poll Postgres' view (no event to wait on) until the tagged pg_sleep is running."""
    deadline = time.monotonic() + 10
    with psycopg.connect(pg.dsn(), autocommit=True) as watcher:
        while not watcher.execute(
            "select 1 from pg_stat_activity where state = 'active' and query like %s",
            (f"%{tag}%",),
        ).fetchone():
            assert time.monotonic() < deadline, "the query never started"
            time.sleep(0.02)


class _Sleeper:
    """``select pg_sleep(30)`` running in a thread on ``conn``; ``result`` is what it raised."""

    def __init__(self, conn: psycopg.Connection[Any], pg: PgCluster, tag: str) -> None:
        self.result: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(conn, tag), daemon=True)
        self.thread.start()
        _until_sleeping(pg, tag)

    def _run(self, conn: psycopg.Connection[Any], tag: str) -> None:
        try:
            conn.execute(f"select pg_sleep(30) /* {tag} */")
        except BaseException as exc:
            self.result = exc

    def cancelled(self) -> bool:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the cancel did not end the query"
        return isinstance(self.result, psycopg.errors.QueryCanceled)


def _route(sup: Supervisor, vpid: int, after: int) -> str:
    """How the worker that received a CancelRequest for ``vpid`` routed it."""
    found = sup.wait_for(
        rf"cancel request for {vpid}: (forwarded to worker \d+|handled here)", after
    )
    return "forwarded" if found[1].startswith("forwarded") else "here"


def test_a_cancel_reaches_its_query_whichever_worker_receives_it(
    running: Supervisor, pg: PgCluster
) -> None:
    """The kernel picks the worker a CancelRequest lands on; repeat until both routes ran."""
    routes: set[str] = set()
    for attempt in range(40):
        with running.connect() as conn:
            mark = running.mark()
            sleeper = _Sleeper(conn, pg, f"cancel-{attempt}")
            conn.cancel()
            assert sleeper.cancelled(), sleeper.result
            routes.add(_route(running, conn.info.backend_pid, mark))
            assert conn.execute("select 2").fetchone() == (2,)
        if routes == {"forwarded", "here"}:
            return
    raise AssertionError(f"40 cancels, all routed {routes}")


def test_a_cancel_with_a_wrong_secret_is_ignored_by_the_owner(
    running: Supervisor, pg: PgCluster
) -> None:
    """Forwarding never skips the owner's secret check: the query keeps running."""
    with running.connect() as conn:
        vpid = conn.info.backend_pid
        sleeper = _Sleeper(conn, pg, "wrong-secret")
        routes: set[str] = set()
        for _ in range(40):
            mark = running.mark()
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
                sock.sendall(m.cancel_request(vpid, b"\xde\xad\xbe\xef"))
                assert sock.recv(1) == b""  # the receiving worker closes once it has it
            routes.add(_route(running, vpid, mark))
            running.wait_for(rf"cancel request for unknown backend {vpid} ignored", mark)
            if routes == {"forwarded", "here"}:
                break
        assert routes == {"forwarded", "here"}
        assert sleeper.thread.is_alive() and sleeper.result is None
        conn.cancel()
        assert sleeper.cancelled(), sleeper.result


def test_notify_through_one_worker_reaches_a_listener_on_the_other(running: Supervisor) -> None:
    conns = _one_per_worker(running)
    with ExitStack() as stack:
        for conn in conns.values():
            stack.enter_context(conn)
        for listener_at, sender_at in ((0, 1), (1, 0)):
            listener, sender = conns[listener_at], conns[sender_at]
            listener.execute("listen across_workers")
            sender.execute("select pg_notify('across_workers', %s)", (f"from {sender_at}",))
            got = list(listener.notifies(timeout=10, stop_after=1))
            assert [(n.channel, n.payload) for n in got] == [
                ("across_workers", f"from {sender_at}")
            ]
            assert got[0].pid != listener.info.backend_pid
            listener.execute("unlisten across_workers")


# --------------------------------------------------------------------------- process management


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "another-pgproxy"])
def test_a_taken_port_is_refused_before_any_worker_starts(tmp_path: Path, reuse_port: bool) -> None:
    """Also when the holder uses SO_REUSEPORT itself: workers never join a stranger's port."""
    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "pgproxy.toml"
        config.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n')
        proc = subprocess.run(
            [sys.executable, "-m", "pgproxy", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "[worker" not in proc.stderr  # no worker was started


def test_sighup_reloads_every_worker(pg: PgCluster, tmp_path: Path) -> None:
    with supervisor(tmp_path, pg) as sup:
        with pytest.raises(psycopg.OperationalError, match='database "alias" does not exist'):
            sup.connect("alias")
        with sup.config.open("a") as f:
            f.write(f'\n[databases.alias]\nurl = "{pg_server_url(pg)}/postgres"\n')
        mark = sup.mark()
        sup.proc.send_signal(signal.SIGHUP)
        for index in range(WORKERS):
            sup.wait_for(rf"\[worker {index}\]: configuration reloaded from", mark)
        for conn in _one_per_worker(sup, "alias").values():
            with conn:
                assert conn.execute("select current_database()").fetchone() == ("postgres",)
        assert sup.proc.poll() is None


def test_a_killed_worker_is_restarted_with_the_last_valid_configuration(
    pg: PgCluster, tmp_path: Path
) -> None:
    """A half-edited file (never SIGHUPed, or rejected on SIGHUP) does not keep it down."""
    with supervisor(tmp_path, pg) as sup:
        with sup.config.open("a") as f:
            f.write("\n[proxy.oops\n")
        mark = sup.mark()
        sup.proc.send_signal(signal.SIGHUP)
        sup.wait_for(r"\[supervisor\]: reload failed, keeping the running configuration: .*"
                     + re.escape(str(sup.config)) + ": invalid TOML", mark)  # fmt: skip
        victim = sup.workers[1]
        mark = sup.mark()
        os.kill(victim, signal.SIGKILL)
        sup.wait_for(rf"worker 1 \(pid {victim}\) killed by signal 9; restarting in", mark)
        found = sup.wait_for(r"\[supervisor\]: worker 1 \(pid (\d+)\) ready", mark)
        assert int(found[1]) != victim
        sup.workers[1] = int(found[1])
        for conn in _one_per_worker(sup).values():  # the new worker serves
            conn.close()


def test_sigterm_stops_every_process(pg: PgCluster, tmp_path: Path) -> None:
    with supervisor(tmp_path, pg) as sup:
        workers = list(sup.workers.values())
        private = Path(_peer_dir(workers[0]))
        with sup.connect() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            sup.proc.send_signal(signal.SIGTERM)
            assert sup.proc.wait(timeout=15) == 0
        assert not [pid for pid in workers if _alive(pid)]
        assert not private.exists()


def test_workers_exit_when_the_supervisor_dies(pg: PgCluster, tmp_path: Path) -> None:
    with supervisor(tmp_path, pg) as sup:
        workers = list(sup.workers.values())
        private = Path(_peer_dir(workers[0]))
        assert (private / "pgproxy.toml").read_text() == sup.config.read_text()
        mark = sup.mark()
        sup.proc.kill()
        sup.proc.wait()
        for index in range(WORKERS):
            sup.wait_for(rf"supervisor is gone; worker {index} shutting down", mark)
        _wait_gone(workers)
        assert not private.exists()  # the snapshot may hold passwords


def _peer_dir(worker: int) -> str:
    """The private directory a worker was given (``--worker INDEX,COUNT,FD,UNIXFD,DIR``)."""
    argv = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"--worker") + 1].decode().split(",", 4)[4]


def test_workers_share_one_unix_socket(pg: PgCluster, tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="pgx-"))  # short: a socket path fits 107 bytes
    try:
        with supervisor(tmp_path, pg, f'unix_socket_dir = "{sock_dir}"') as sup:
            path = sock_dir / f".s.PGSQL.{sup.port}"
            conninfo = f"host={sock_dir} port={sup.port} user=postgres dbname=postgres"
            owners: set[int | None] = set()
            for _ in range(200):  # the kernel hands each accept to one worker
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                    assert conn.execute("select 1").fetchone() == (1,)
                    owners.add(vpid_owner(conn.info.backend_pid, WORKERS))
                if len(owners) == WORKERS:
                    break
            assert owners == set(range(WORKERS))
            sup.proc.terminate()
            assert sup.proc.wait(timeout=15) == 0
            assert not path.exists()  # the supervisor bound it, and removed it
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
