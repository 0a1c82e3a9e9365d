"""Shutting down without cutting a transaction: SIGTERM drains at transaction boundaries.

Real pgproxy processes, real psycopg clients. Each client learns of the shutdown as Postgres
tells of an administrator's: FATAL 57P01, and only between transactions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from pgproxy.testing.cluster import PgCluster
from tests.conftest import pg_server_url
from tests.support.process import free_port, proxy_process


def _config(pg: PgCluster, tmp_path: Path, port: int, extra: str = "", name: str = "p") -> Path:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nlog_level = "info"\ndefault_pool_size = 5\n'
        f"{extra}\n"
        f'[databases.main]\nurl = "{pg_server_url(pg)}/postgres"\n'
    )
    return config


def _dsn(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/main"


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll what offers no event to wait on (another process's sockets)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _log_so_far(proc: subprocess.Popen[bytes]) -> str:
    """What the process logged until now (its stdout is a pipe: read what is there)."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    chunk = proc.stdout.read() or b""
    _LOGS[proc.pid] = _LOGS.get(proc.pid, "") + chunk.decode(errors="replace")
    return _LOGS[proc.pid]


_LOGS: dict[int, str] = {}


@contextmanager
def _stopping(stop: threading.Event) -> Iterator[None]:
    """Client loops end with the block, also when an assertion fails in it."""
    try:
        yield
    finally:
        stop.set()


def _is_admin_shutdown(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("select 1")
    except pg_errors.AdminShutdown:
        return True
    except psycopg.OperationalError as exc:  # closed by the FATAL libpq already read
        return "57P01" in str(exc) or "shutting down" in str(exc) or conn.closed
    return False


@contextmanager
def _clients(
    port: int,
) -> Iterator[tuple[psycopg.Connection, psycopg.Connection, psycopg.Connection]]:
    idle = psycopg.connect(_dsn(port), autocommit=True)
    busy = psycopg.connect(_dsn(port))  # not autocommit: a transaction opens at the first query
    listener = psycopg.connect(_dsn(port), autocommit=True)
    try:
        yield idle, busy, listener
    finally:
        for conn in (idle, busy, listener):
            conn.close()


def test_sigterm_closes_each_client_at_its_transaction_boundary(
    pg: PgCluster, tmp_path: Path
) -> None:
    port = free_port()
    with proxy_process(_config(pg, tmp_path, port), port) as proc, _clients(port) as clients:
        idle, busy, listener = clients
        idle.execute("select 1")
        listener.execute("LISTEN jobs")
        assert busy.execute("select 1").fetchone() == (1,)  # inside a transaction now
        os.kill(proc.pid, signal.SIGTERM)
        _until(lambda: _refused(port))  # stops accepting at once
        # Between transactions: closed at once, with 57P01.
        assert _is_admin_shutdown(idle)
        assert _is_admin_shutdown(listener)
        # Mid-transaction: carries on to its COMMIT, which succeeds; then it is closed.
        assert busy.execute("select 2").fetchone() == (2,)
        busy.commit()
        assert _is_admin_shutdown(busy)
        assert proc.wait(timeout=15) == 0
        log = _log_so_far(proc)
        assert "draining" in log and "cut at the timeout" not in log


def test_a_transaction_that_outlives_shutdown_timeout_is_cancelled(
    pg: PgCluster, tmp_path: Path
) -> None:
    port = free_port()
    config = _config(pg, tmp_path, port, "shutdown_timeout = 1")
    with proxy_process(config, port) as proc, psycopg.connect(_dsn(port)) as busy:
        busy.execute("select 1")
        outcome: list[BaseException | None] = []
        started = threading.Event()

        def sleeper() -> None:
            started.set()
            try:
                busy.execute("select pg_sleep(60)")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=sleeper)
        thread.start()
        started.wait()
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        thread.join(20)
        assert time.monotonic() - t0 < 15
        assert outcome and isinstance(outcome[0], psycopg.Error)  # cancelled and closed


def test_a_second_sigterm_stops_at_once(pg: PgCluster, tmp_path: Path) -> None:
    port = free_port()
    config = _config(pg, tmp_path, port, "shutdown_timeout = 60")
    with (
        proxy_process(config, port) as proc,
        contextlib.closing(psycopg.connect(_dsn(port))) as busy,
    ):
        busy.execute("select 1")  # a transaction that would hold the drain for 60 s
        os.kill(proc.pid, signal.SIGTERM)
        _until(lambda: _refused(port))
        assert proc.poll() is None  # still draining
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        with pytest.raises(psycopg.OperationalError):
            busy.execute("select 2")  # cut: the second signal does not wait for it


def test_sigquit_stops_at_once(pg: PgCluster, tmp_path: Path) -> None:
    port = free_port()
    config = _config(pg, tmp_path, port, "shutdown_timeout = 60")
    with (
        proxy_process(config, port) as proc,
        contextlib.closing(psycopg.connect(_dsn(port))) as busy,
    ):
        busy.execute("select 1")
        os.kill(proc.pid, signal.SIGQUIT)
        assert proc.wait(timeout=10) == 0


def test_sigusr1_pauses_and_sigusr2_resumes(pg: PgCluster, tmp_path: Path) -> None:
    port = free_port()
    with proxy_process(_config(pg, tmp_path, port), port) as proc:
        with psycopg.connect(_dsn(port), autocommit=True) as conn:
            conn.execute("select 1")
        os.kill(proc.pid, signal.SIGUSR1)
        _until(lambda: "paused all databases" in _log_so_far(proc))
        done = threading.Event()

        def query() -> None:
            with psycopg.connect(_dsn(port), autocommit=True) as c:
                c.execute("select 1")
            done.set()

        thread = threading.Thread(target=query)
        thread.start()
        assert not done.wait(1.0)  # held while paused
        os.kill(proc.pid, signal.SIGUSR2)
        assert done.wait(10)
        thread.join()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_restart_beside_the_running_proxy_loses_no_transaction(
    pg: PgCluster, tmp_path: Path, workers: int
) -> None:
    """Old and new pgproxy share the port (so_reuseport); the old one drains. A client that
    reconnects on 57P01 and retries, as pools do, sees every transaction succeed."""
    port = free_port()
    extra = f"so_reuseport = true\nworkers = {workers}"
    old_config = _config(pg, tmp_path, port, extra, name="old")
    new_config = _config(pg, tmp_path, port, extra, name="new")
    committed, failures, stop = [0], [], threading.Event()

    def client_loop() -> None:
        conn = None
        while not stop.is_set():
            started = False  # whether the transaction ran a statement (then it must commit)
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(_dsn(port))
                with conn.transaction():
                    conn.execute("select 1")
                    started = True
                    conn.execute("select 2")
                committed[0] += 1
            except psycopg.Error as exc:
                conn = None
                # Closed between transactions (57P01, or the close libpq saw first): a pool
                # reconnects and runs the transaction; nothing of it had run.
                if started:
                    failures.append(repr(exc))
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(4)]
    with proxy_process(old_config, port) as old, _stopping(stop):
        for thread in threads:
            thread.start()
        _until(lambda: committed[0] > 50)
        with proxy_process(new_config, port) as new:
            # Wait until the new process (each of its workers) accepts on the shared port.
            _until(lambda: _log_so_far(new).count("pgproxy listening on") >= workers)
            os.kill(old.pid, signal.SIGTERM)
            assert old.wait(timeout=30) == 0
            before = committed[0]
            _until(lambda: committed[0] > before + 50)  # served by the new one alone
            stop.set()
            for thread in threads:
                thread.join(10)
            assert new.poll() is None
    assert failures == []


@pytest.mark.parametrize("workers", [1, 2])
def test_the_console_stays_reachable_on_the_unix_socket_while_draining(
    pg: PgCluster, tmp_path: Path, workers: int
) -> None:
    port = free_port()
    sockets = tmp_path / "s"
    sockets.mkdir()
    extra = f'workers = {workers}\nunix_socket_dir = "{sockets}"\nadmin_users = ["postgres"]'
    config = _config(pg, tmp_path, port, extra)
    with (
        proxy_process(config, port) as proc,
        contextlib.closing(psycopg.connect(_dsn(port))) as busy,
    ):
        busy.execute("select 1")  # a transaction keeps the drain going
        os.kill(proc.pid, signal.SIGTERM)
        _until(lambda: _refused(port))
        unix = f"host={sockets} port={port} user=postgres"
        with psycopg.connect(f"{unix} dbname=pgbouncer", autocommit=True) as console:
            assert console.execute("SHOW VERSION").fetchone() is not None
        with pytest.raises(psycopg.OperationalError, match="shutting down"):
            psycopg.connect(f"{unix} dbname=main")
        busy.commit()
        assert proc.wait(timeout=30) == 0
