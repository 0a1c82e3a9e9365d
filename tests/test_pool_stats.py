"""A pool's traffic counters after known traffic, driven with bytes alone (in-memory)."""

from __future__ import annotations

import asyncio

from pgproxy.protocol import messages as m
from pgproxy.testing.memory import memory_client, memory_proxy

SELECT = m.query("SELECT 1")
ROWS = m.row_description([("?column?", 23)]) + m.data_row(["1"]) + m.command_complete("SELECT 1")


async def test_transactions_queries_and_bytes_are_counted_at_release() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool)
    reply = ROWS + m.ready_for_query(m.IDLE)
    for _ in range(3):
        client.data_received(SELECT)
        server = client.server
        assert server is not None
        server.data_received(reply)
    stats = pool.stats
    totals = stats.as_dict()
    assert (totals["server_assignment_count"], totals["xact_count"], totals["query_count"]) == (
        3,
        3,
        3,
    )
    assert stats.bytes_received == 3 * len(SELECT)
    assert stats.bytes_sent == 3 * len(reply)
    totals = stats.as_dict()
    assert totals["xact_time"] >= totals["query_time"] >= 0
    assert stats.client_login_count == 1


async def test_an_explicit_transaction_is_one_xact_of_several_queries() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool)
    statuses = [m.IN_TRANSACTION, m.IN_TRANSACTION, m.IDLE]  # BEGIN; SELECT; COMMIT
    for status in statuses:
        client.data_received(SELECT)
        server = client.server
        assert server is not None
        server.data_received(m.command_complete("X") + m.ready_for_query(status))
        if status != m.IDLE:
            assert client.server is server  # still in the transaction
    stats = pool.stats
    totals = stats.as_dict()
    assert (totals["server_assignment_count"], totals["xact_count"], totals["query_count"]) == (
        1,
        1,
        3,
    )
    # The client was idle in the transaction between its statements: query time excludes it.
    assert stats.as_dict()["query_time"] <= stats.as_dict()["xact_time"]


async def test_waiting_extended_parse_and_bind_are_counted() -> None:
    proxy, pool = memory_proxy(1)
    a, b = await memory_client(proxy, pool), await memory_client(proxy, pool)
    a.data_received(SELECT)
    extended = m.parse("s1", "SELECT 1", []) + m.bind("", "s1", []) + m.execute()
    b.data_received(extended + m.message(m.SYNC))  # waits for a's server
    server = a.server
    assert server is not None and b.server is None
    await asyncio.sleep(0.002)  # the wait being measured
    server.data_received(ROWS + m.ready_for_query(m.IDLE))
    assert b.server is server
    server.data_received(
        m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + ROWS + m.ready_for_query(m.IDLE)
    )
    stats = pool.stats
    assert stats.as_dict()["wait_time"] >= 2000  # µs
    assert (stats.client_parse_count, stats.server_parse_count, stats.bind_count) == (1, 1, 1)
    assert stats.as_dict()["xact_count"] == 2
