"""``workers = N`` shows and controls the whole proxy, whichever worker is reached.

pgproxy runs as real processes (a supervisor and two SO_REUSEPORT workers); which worker
serves a connection is read from its virtual backend PID (``vpid_owner``). A console client
on either worker, and /metrics from either, must see every client and add up the traffic of
both; PAUSE and RESUME given on one act on both; a worker that does not answer (SIGSTOP) is
left out within the timeout, never waited for. The peer channel's parser is fed bytes too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.admin.whole import COMMAND_TIMEOUT, GATHER_TIMEOUT
from pgproxy.app import vpid_owner
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.testing.cluster import PgCluster
from pgproxy.workers import peerwire
from tests.conftest import pg_server_url
from tests.support.process import free_port
from tests.test_ops_http import get
from tests.test_workers import WORKERS, Supervisor, _alive, _wait_gone, supervisor

CLIENTS = 20
TRANSACTIONS = 3  # per client


def _extra(pg: PgCluster, metrics_port: int) -> str:
    """[proxy] settings for these tests, and a database of their own ("whole"), whose
    figures only they make."""
    return (
        f'admin_users = ["postgres"]\nmetrics_listen = "127.0.0.1:{metrics_port}"\n'
        f'[databases.whole]\nurl = "{pg_server_url(pg)}/postgres"\n'
    )


@pytest.fixture(scope="module")
def whole(
    pg: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Supervisor, int]]:
    port = free_port()
    with supervisor(tmp_path_factory.mktemp("whole"), pg, _extra(pg, port)) as sup:
        yield sup, port


def _owner(conn: psycopg.Connection[Any]) -> int:
    owner = vpid_owner(conn.info.backend_pid, WORKERS)
    assert owner is not None, conn.info.backend_pid
    return owner


def _on_worker(sup: Supervisor, index: int, dbname: str) -> psycopg.Connection[Any]:
    """A connection that worker ``index`` serves (the kernel picks: connect until it does)."""
    for _ in range(200):
        conn = sup.connect(dbname)
        if _owner(conn) == index:
            return conn
        conn.close()
    raise AssertionError(f"200 connections, none served by worker {index}")


def _show(console: psycopg.Connection[Any], what: str) -> list[dict[str, Any]]:
    cur = console.execute(f"SHOW {what}")
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def _scrape(port: int) -> tuple[int, dict[str, Any]]:
    """(the answering process's pid, the metric families by name)."""
    status, headers, body = get(port, "/metrics")
    assert status == 200, body
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return int(headers["x-pgproxy-pid"]), families


def _sum(family: Any, **labels: str) -> float:
    return sum(
        float(s.value)
        for s in family.samples
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_every_worker_shows_all_clients_and_all_transactions(
    whole: tuple[Supervisor, int],
) -> None:
    sup, metrics_port = whole
    with ExitStack() as stack:
        clients = [stack.enter_context(sup.connect("whole")) for _ in range(CLIENTS)]
        by_worker = {_owner(c) for c in clients}
        assert by_worker == set(range(WORKERS)), "SO_REUSEPORT gave one worker all 20"
        for conn in clients:
            for _ in range(TRANSACTIONS):
                assert conn.execute("select 1").fetchone() == (1,)
        ids = {c.info.backend_pid for c in clients}
        expected = CLIENTS * TRANSACTIONS

        for index in range(WORKERS):
            console = stack.enter_context(_on_worker(sup, index, "pgbouncer"))
            shown = [c for c in _show(console, "CLIENTS") if c["database"] == "whole"]
            assert {c["id"] for c in shown} == ids
            stats = _row(_show(console, "STATS_TOTALS"), database="whole")
            assert stats["xact_count"] == expected
            assert stats["query_count"] == expected
            pool = _row(_show(console, "POOLS"), database="whole")
            assert (pool["cl_active"], pool["cl_waiting"]) == (CLIENTS, 0)
            database = _row(_show(console, "DATABASES"), name="whole")
            assert database["current_client_connections"] == CLIENTS
            lists = {r["list"]: r["items"] for r in _show(console, "LISTS")}
            assert lists["used_clients"] >= CLIENTS + 1  # the consoles are clients too

        answered: set[int] = set()
        for _ in range(100):  # the kernel picks the worker: scrape until both have answered
            pid, families = _scrape(metrics_port)
            answered.add(pid)
            xacts = families["pgbouncer_stats_totals_sql_transactions_pooled"]
            assert _sum(xacts, database="whole") == expected
            assert _sum(families["pgbouncer_client_connections"], database="whole") == CLIENTS
            active = families["pgbouncer_pools_client_active_connections"]
            assert _sum(active, database="whole", user="postgres") == CLIENTS
            assert _sum(families["pgproxy_workers_answering"]) == WORKERS
            assert _sum(families["pgproxy_workers"]) == WORKERS
            if len(answered) == WORKERS:
                break
        assert answered == set(sup.workers.values())


def _select_in_thread(conn: psycopg.Connection[Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: conn.execute("select 1"), daemon=True)
    thread.start()
    return thread


def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_pause_on_one_worker_holds_both_and_resume_releases_them(
    whole: tuple[Supervisor, int],
) -> None:
    sup, _ = whole
    with ExitStack() as stack:
        clients = [stack.enter_context(_on_worker(sup, i, "whole")) for i in range(WORKERS)]
        console = stack.enter_context(_on_worker(sup, 0, "pgbouncer"))
        try:
            console.execute("PAUSE whole")  # answered once both workers have paused
            assert _row(_show(console, "DATABASES"), name="whole")["paused"] == 1
            held = [_select_in_thread(conn) for conn in clients]
            _until(lambda: _row(_show(console, "POOLS"), database="whole")["cl_waiting"] == 2)
            time.sleep(0.3)
            assert all(thread.is_alive() for thread in held)
        finally:
            console.execute("RESUME whole")
        for thread in held:
            thread.join(10)
            assert not thread.is_alive(), "RESUME did not release a worker's client"
        assert _row(_show(console, "DATABASES"), name="whole")["paused"] == 0
        assert _row(_show(console, "POOLS"), database="whole")["cl_waiting"] == 0


def test_kill_client_reaches_the_clients_worker(whole: tuple[Supervisor, int]) -> None:
    sup, _ = whole
    with ExitStack() as stack:
        console = stack.enter_context(_on_worker(sup, 0, "pgbouncer"))
        victim = stack.enter_context(_on_worker(sup, 1, "whole"))
        console.execute(f"KILL_CLIENT {victim.info.backend_pid}")
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            victim.execute("select 1")
        with pytest.raises(psycopg.errors.UndefinedObject, match="client not found: 42"):
            console.execute("KILL_CLIENT 42")
        with pytest.raises(psycopg.errors.InvalidCatalogName, match="no such database: nope"):
            console.execute("PAUSE nope")


def test_a_stopped_worker_is_left_out_within_the_timeout(whole: tuple[Supervisor, int]) -> None:
    sup, _ = whole
    with ExitStack() as stack:
        mine = stack.enter_context(_on_worker(sup, 0, "whole"))
        theirs = stack.enter_context(_on_worker(sup, 1, "whole"))
        console = stack.enter_context(_on_worker(sup, 0, "pgbouncer"))
        notices: list[str] = []
        console.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        stopped = sup.workers[1]
        mark = sup.mark()
        os.kill(stopped, signal.SIGSTOP)
        try:
            started = time.monotonic()
            shown = {c["id"] for c in _show(console, "CLIENTS") if c["database"] == "whole"}
            took = time.monotonic() - started
            assert GATHER_TIMEOUT - 0.1 <= took < GATHER_TIMEOUT + 2, took
            assert shown == {mine.info.backend_pid}  # what worker 0 said, without worker 1's
            assert notices == [
                "1 of 2 workers did not answer in time: their clients, servers and counters "
                "are missing from this answer"
            ]
            sup.wait_for(r"worker 1 left out of the whole proxy's figures: no answer in time", mark)
            # A control command reports the worker that did not run it.
            with pytest.raises(psycopg.errors.InternalError) as info:
                console.execute("RESUME whole")
            assert str(info.value).startswith(
                "RESUME failed on worker 1: no answer in time (it ran on worker 0)"
            )
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert time.monotonic() - started < GATHER_TIMEOUT + COMMAND_TIMEOUT + 4
        shown = {c["id"] for c in _show(console, "CLIENTS") if c["database"] == "whole"}
        assert shown == {mine.info.backend_pid, theirs.info.backend_pid}
        assert theirs.execute("select 1").fetchone() == (1,)


def test_shutdown_on_the_console_stops_every_worker(pg: PgCluster, tmp_path: Path) -> None:
    with supervisor(tmp_path, pg, _extra(pg, free_port())) as sup:
        workers = list(sup.workers.values())
        with _on_worker(sup, 1, "pgbouncer") as console:
            console.execute("SHUTDOWN WAIT_FOR_CLIENTS")
        assert sup.proc.wait(timeout=15) == 0
        _wait_gone(workers)
        assert not [pid for pid in workers if _alive(pid)]


# --------------------------------------------------------------------------- the channel


def _parse(data: bytes, answer: int | None = None) -> Any:
    """What peerwire makes of ``data`` (a request, or the answer to a request of kind
    ``answer``), as a worker reading it from its socket would."""

    async def read() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        if answer is None:
            return await peerwire.read_request(reader)
        return await peerwire.read_answer(reader, answer)

    return asyncio.run(read())


def test_the_peer_channel_parses_what_it_builds_and_refuses_the_rest() -> None:
    cancel = m.CancelRequest(1 << 22, b"\x01\x02\x03\x04")
    assert _parse(peerwire.cancel_request(cancel)) == cancel
    assert _parse(peerwire.snapshot_request()) is None
    assert _parse(peerwire.control_request("pause", "app")) == peerwire.Control("pause", "app")
    assert _parse(peerwire.done("PAUSE"), peerwire.CONTROL) == "PAUSE"
    failed = peerwire.failed(PgError("3D000", "no such database: x"))
    with pytest.raises(PgError, match="no such database: x") as info:
        _parse(failed, peerwire.CONTROL)
    assert info.value.sqlstate == "3D000"
    for bad, why in [
        (b"Z\x00\x00\x00\x00", "unknown peer message"),
        (b"S\x00\x00\x00\x01x", "too long"),  # a snapshot request has no body
        (b"X\x00\x00\x10\x00", "too long"),  # a command over 1 KiB is never read
        (b"X\x00\x00\x00\x02[]", "bad peer message"),
        (b"X\x00\x00\x00\x05[1,2]", "bad control command"),
        (b"C\x00\x00\x00\x10" + b"\x00" * 16, "bad forwarded cancel request"),
        (b'X\x00\x00\x00\x09["a"', "closed within a message"),
        (b"X\x00", "closed without a whole message"),
    ]:
        with pytest.raises(m.ProtocolError, match=why):
            _parse(bad)
    with pytest.raises(m.ProtocolError, match="not a snapshot"):
        _parse(b'K\x00\x00\x00\x07{"a":1}', peerwire.SNAPSHOT)
    too_big = b"K" + (peerwire.SNAPSHOT_MAX + 1).to_bytes(4, "big")
    with pytest.raises(m.ProtocolError, match="too long"):
        _parse(too_big, peerwire.SNAPSHOT)
