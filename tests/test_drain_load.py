"""A drain under load: asyncpg and psycopg clients in transaction loops, a client in the middle
of a COPY, and listeners that move to the process started beside the draining one."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import asyncpg
import psycopg
from psycopg import errors as pg_errors

from pgproxy.testing.cluster import PgCluster
from tests.support.process import free_port, proxy_process
from tests.test_drain import _config, _dsn, _log_so_far, _refused, _stopping, _until


def _asyncpg_loop(port: int, stop: threading.Event, committed: list[int], cut: list[str]) -> None:
    """Transactions of two statements until the proxy closes the connection between two."""

    async def run() -> None:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/main")
        try:
            while not stop.is_set():
                started = False
                try:
                    async with conn.transaction():
                        await conn.fetchval("select 1")
                        started = True
                        await conn.fetchval("select 2")
                    committed[0] += 1
                except Exception as exc:  # asyncpg's errors for a closed connection vary
                    if started:
                        cut.append(repr(exc))
                    return  # closed between transactions: this client is done
        finally:
            conn.terminate()

    asyncio.run(run())


def test_a_drain_under_load_cuts_no_transaction_and_no_copy(pg: PgCluster, tmp_path: Path) -> None:
    pg.psql("create table if not exists drain_copy (n int)")
    pg.psql("truncate drain_copy")
    port = free_port()
    committed, cut, stop = [0], [], threading.Event()
    loops = [
        threading.Thread(target=_asyncpg_loop, args=(port, stop, committed, cut), daemon=True)
        for _ in range(3)
    ]
    with (
        proxy_process(_config(pg, tmp_path, port, "shutdown_timeout = 20"), port) as proc,
        _stopping(stop),
    ):
        for thread in loops:
            thread.start()
        _until(lambda: committed[0] > 30)
        copier = psycopg.connect(_dsn(port))
        try:
            with copier.cursor() as cur, cur.copy("COPY drain_copy FROM STDIN") as copy:
                copy.write_row((1,))
                os.kill(proc.pid, signal.SIGTERM)  # the drain starts mid-COPY
                _until(lambda: _refused(port))
                for n in range(2, 101):
                    copy.write_row((n,))
            copier.commit()  # the COPY and its transaction end normally
            try:
                copier.execute("select 1")
                raise AssertionError("the client was not closed after its transaction")
            except (pg_errors.AdminShutdown, psycopg.OperationalError):
                pass
        finally:
            copier.close()
        for thread in loops:
            thread.join(20)
        assert proc.wait(timeout=30) == 0
        assert "cut at the timeout" not in _log_so_far(proc)
    assert cut == []
    assert pg.psql("select count(*), sum(n) from drain_copy") == "100|5050"


def test_listeners_move_to_the_new_process_and_hear_what_follows(
    pg: PgCluster, tmp_path: Path
) -> None:
    port = free_port()
    extra = "so_reuseport = true"
    old_config = _config(pg, tmp_path, port, extra, name="old")
    new_config = _config(pg, tmp_path, port, extra, name="new")
    with proxy_process(old_config, port) as old:
        listener = psycopg.connect(_dsn(port), autocommit=True)
        listener.execute("LISTEN moved")
        with proxy_process(new_config, port) as new:
            _until(lambda: "pgproxy listening on" in _log_so_far(new))
            os.kill(old.pid, signal.SIGTERM)
            assert old.wait(timeout=30) == 0
            try:  # closed at once (it was between transactions): 57P01
                listener.execute("select 1")
                raise AssertionError("the listener was not closed by the drain")
            except (pg_errors.AdminShutdown, psycopg.OperationalError):
                listener.close()
            # As a pool does: reconnect, LISTEN again, read the state, then wait.
            with psycopg.connect(_dsn(port), autocommit=True) as again:
                again.execute("LISTEN moved")
                with psycopg.connect(pg.dsn(), autocommit=True) as direct:
                    direct.execute("NOTIFY moved, 'after the move'")
                got = list(again.notifies(timeout=10, stop_after=1))
                assert [n.payload for n in got] == ["after the move"]
