"""Clients that vanish mid-transaction in every way (issue 16): FIN, RST, mid-query, half a
message, extended protocol without Sync. Each time the row lock the client held is released,
no pooled server stays stuck, and the proxy serves the next client."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import psycopg
import pytest

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.support.load import no_server_stays_taken
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, error_of

LOCK = "update t_fault set v = v + 1 where k = 1"


def _in_transaction(c: RawClient) -> None:
    assert error_of(c.query("begin")) is None
    assert error_of(c.query(LOCK)) is None  # holds the row lock


def _fin(c: RawClient) -> None:
    _in_transaction(c)  # the close below sends FIN, without a Terminate


def _rst(c: RawClient) -> None:
    _in_transaction(c)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST


def _mid_query(c: RawClient) -> None:
    _in_transaction(c)
    c.send(m.query("select pg_sleep(3)"))  # the server is busy when the client goes


def _half_a_message(c: RawClient) -> None:
    _in_transaction(c)
    whole = m.query("select 'an unfinished query'")
    c.send(whole[: len(whole) // 2])


def _extended_without_sync(c: RawClient) -> None:
    c.send(m.parse("", LOCK) + m.bind("", "") + m.execute())  # an implicit transaction


def _row_lock_held(pg: PgCluster) -> bool:
    return (
        pg.psql(
            "select count(*) from pg_locks l join pg_class r on r.oid = l.relation"
            " where r.relname = 't_fault' and l.mode = 'RowExclusiveLock' and l.granted"
        )
        != "0"
    )


@pytest.mark.parametrize(
    "vanish",
    [_fin, _rst, _mid_query, _half_a_message, _extended_without_sync],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_vanished_client_leaves_no_lock_and_no_stuck_server(
    proxy: ProxyThread, pg: PgCluster, vanish: Callable[[RawClient], None]
) -> None:
    pg.psql("create table if not exists t_fault (k int primary key, v int)")
    pg.psql("insert into t_fault values (1, 0) on conflict (k) do update set v = 0")
    c = RawClient(proxy.port)
    c.login()
    vanish(c)
    deadline = time.monotonic() + 10
    while not _row_lock_held(pg):  # no reply tells when the extended Execute has run
        assert time.monotonic() < deadline, "the client's statement never took its lock"
        time.sleep(0.02)
    c.close()
    # The lock is released (its transaction rolled back with the server's cleanup or close).
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute("set lock_timeout = '10s'")
        direct.execute(LOCK)
        assert direct.execute("select v from t_fault where k = 1").fetchone() == (1,)
    # No pooled server stays taken, and the proxy serves on.
    no_server_stays_taken(proxy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as next_client:
        assert next_client.execute("select v from t_fault where k = 1").fetchone() == (1,)
