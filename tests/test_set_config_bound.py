"""``set_config(name, $1, false)`` with the value bound in the extended protocol (asyncpg runs
``SELECT set_config('jit', $1, false)`` on every connection) follows the client like a SET."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import MakeProxy

SET = "SELECT set_config('statement_timeout', $1, false)"


async def test_a_bound_set_config_follows_the_client_and_leaks_to_no_one(
    make_proxy: MakeProxy,
) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1})  # both clients share the one server
    setter = await asyncpg.connect(proxy.dsn())
    other = await asyncpg.connect(proxy.dsn())
    try:
        assert await setter.fetchval(SET, "4321") == "4321ms"
        assert await other.fetchval("SHOW statement_timeout") == "0"  # not this client's
        assert await setter.fetchval("SHOW statement_timeout") == "4321ms"
        async with setter.transaction():  # committed: it holds
            await setter.execute(SET, "99")
        assert await other.fetchval("SHOW statement_timeout") == "0"
        assert await setter.fetchval("SHOW statement_timeout") == "99ms"
        rolled_back = setter.transaction()
        await rolled_back.start()
        await setter.execute(SET, "77")
        await rolled_back.rollback()  # as Postgres: it never happened
        assert await other.fetchval("SHOW statement_timeout") == "0"
        assert await setter.fetchval("SHOW statement_timeout") == "99ms"
    finally:
        await setter.close()
        await other.close()


async def test_asyncpg_connections_log_no_untracked_state(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy()
    for _ in range(3):
        conn = await asyncpg.connect(proxy.dsn())
        await conn.fetchval("SELECT set_config('jit', $1, false)", "off")
        assert await conn.fetchval("SHOW jit") == "off"
        await conn.close()
    assert "will not follow" not in caplog.text


async def test_untracked_session_state_is_logged_once_per_pool_not_per_connection(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy()
    for _ in range(3):
        conn = await asyncpg.connect(proxy.dsn())
        await conn.execute("SELECT pg_advisory_lock(42); SELECT pg_advisory_unlock(42)")
        await conn.close()
    assert caplog.text.count("a session-level advisory lock (pg_advisory_lock)") == 1
