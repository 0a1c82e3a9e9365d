"""A client that leaves at the moment a server is handed to it (the hostile-connections
datasheet row: servers left in use for good in session mode). A release delivers the server
synchronously into the waiting login's future; if the client disconnects before that task
resumes, the task is cancelled and never takes the server. The server must go back to the
pool, not stay counted as in use (``SHOW POOLS`` sv_active) with no client."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
import pytest

from pgproxy.pool.pool import Pool
from tests.conftest import MakeProxy


@pytest.mark.in_process
def test_a_server_handed_to_a_client_that_just_left_goes_back(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"pool_mode": "session", "default_pool_size": 1})

    async def handover_then_leave(p: Any) -> dict[str, int]:
        pool: Pool = p.pool_for("postgres", "postgres")
        holder = await pool.acquire(5)  # the pool's only server
        login = asyncio.create_task(pool.acquire(5))  # a client waiting for it
        await asyncio.sleep(0)  # one loop turn: its task starts and queues
        assert len(pool.waiters) == 1
        pool.release(holder)  # handed over to the waiter, synchronously ...
        login.cancel()  # ... whose client leaves before its task resumes
        with contextlib.suppress(asyncio.CancelledError):
            await login
        return pool.counts()

    counts = proxy.call(handover_then_leave)
    assert (counts["active"], counts["idle"], counts["total"]) == (0, 1, 1)
    # With one server per pool, a lost one would leave every later client waiting for good.
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as real:
        assert real.execute("select 6 * 7").fetchone() == (42,)
