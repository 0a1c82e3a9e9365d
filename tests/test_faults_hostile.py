"""Hundreds of hostile connections at once (issue 16): garbage, bad lengths, truncated and
oversized startups, SSL/GSS confusion, silence, bad messages after login. Afterwards the
proxy holds no client, no pooled server stays taken, and a real client is served."""

from __future__ import annotations

import asyncio
import os
import struct
import time

import psycopg
import pytest

from pgproxy.protocol import messages as m
from tests.conftest import MakeProxy

STARTUP = m.startup_message({"user": "postgres", "database": "postgres"})


def _startup_with(params: dict[str, str]) -> bytes:
    return m.startup_message(params)


HOSTILE: dict[str, bytes] = {
    "garbage": os.urandom(64),
    "short length": struct.pack("!i", 3) + b"\0\0\0\0",
    "huge length": struct.pack("!ii", 1 << 30, 3 << 16),
    "truncated startup": STARTUP[: len(STARTUP) // 2],
    "parameter flood": _startup_with(
        {"user": "postgres", "database": "postgres", **{f"p{i}": "x" for i in range(600)}}
    ),
    "ssl then garbage": m.ssl_request() + os.urandom(32),
    "gss then ssl then nothing": m.gssenc_request() + m.ssl_request(),
    "silence": b"",
    "bad message after startup": STARTUP + b"Y" + struct.pack("!i", 4),
    "huge message after startup": STARTUP + b"Q" + struct.pack("!i", 0x3FFFFFFF) + b"SELECT",
    "half a message after startup": STARTUP + m.query("select 1")[:7],
}


async def _hostile(port: int, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        # Read whatever the proxy answers until it closes (login timeout for the silent).
        await asyncio.wait_for(reader.read(1 << 20), 10)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])  # session: a server per login
async def test_hundreds_of_hostile_connections_leave_nothing_behind(
    make_proxy: MakeProxy, mode: str
) -> None:
    proxy = make_proxy(proxy={"client_login_timeout": 1, "default_pool_size": 4, "pool_mode": mode})
    with psycopg.connect(proxy.dsn(), autocommit=True) as warm:  # a pool and servers exist
        warm.execute("select 1")
    attacks = [_hostile(proxy.port, p) for p in HOSTILE.values() for _ in range(40)]
    started = time.monotonic()
    await asyncio.gather(*attacks)
    assert time.monotonic() - started < 30
    # Every hostile connection is gone, no server is stuck, and the proxy serves.
    deadline = time.monotonic() + 10
    while True:
        state = await asyncio.to_thread(
            proxy.call,
            lambda p: (p.client_count, sum(len(pool.active) for pool in p.pools.values())),
        )
        if state == (0, 0):
            break
        assert time.monotonic() < deadline, f"left behind: clients, active servers = {state}"
        await asyncio.sleep(0.05)
    with psycopg.connect(proxy.dsn(), autocommit=True) as real:
        assert real.execute("select 6 * 7").fetchone() == (42,)
