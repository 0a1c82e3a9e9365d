"""The client's input state machine, driven with bytes alone through every transition.

Real sessions and servers over in-memory transports (``pgproxy.testing.memory``): each test of
the table below puts a client in the transition's starting mode, does what the transition's
event says, and checks the mode after it and what the client was sent. A last test checks that
the scenarios cover ``stream.TRANSITIONS`` exactly, so a new transition needs a scenario.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pgproxy.backend import ServerConnection
from pgproxy.client import stream
from pgproxy.client.session import ClientSession
from pgproxy.client.stream import ADMIN, CLOSED, LINKED, LOGIN, SKIPPING, UNLINKED, WAITING
from pgproxy.protocol import messages as m
from pgproxy.testing.memory import MemoryTransport, memory_client, memory_proxy

SELECT = m.query("SELECT 1")
REPLY = (
    m.row_description([("?column?", 23)])
    + m.data_row(["1"])
    + m.command_complete("SELECT 1")
    + m.ready_for_query(m.IDLE)
)
EXTENDED_NO_SYNC = m.parse("", "SELECT 1", []) + m.bind("", "", []) + m.execute()
SYNC = m.message(m.SYNC)


def sent(client: ClientSession) -> bytes:
    transport = client.transport
    assert isinstance(transport, MemoryTransport)
    return transport.take()


def types_of(data: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(data):
        out.append(chr(data[pos]))
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
    return out


def linked_server(client: ClientSession) -> ServerConnection:
    server = client.server
    assert server is not None
    return server


async def two_clients_one_server() -> tuple[ClientSession, ClientSession]:
    """``a`` holds the only server (a Query in flight); ``b`` is waiting for it."""
    proxy, pool = memory_proxy(1)
    a, b = await memory_client(proxy, pool, keep=True), await memory_client(proxy, pool, keep=True)
    a.data_received(SELECT)
    assert a.mode == LINKED
    return a, b


async def console_client() -> ClientSession:
    """A client logged in to the admin console by its startup packet (trust, admin_users)."""
    proxy, _ = memory_proxy(1, {"admin_users": ["admin"]})
    client = ClientSession(proxy)  # type: ignore[arg-type]
    client.connection_made(MemoryTransport(keep=True))  # type: ignore[arg-type]
    client.data_received(m.startup_message({"user": "admin", "database": "pgbouncer"}))
    for _ in range(20):
        if client.mode != LOGIN:
            break
        await asyncio.sleep(0)
    return client


Scenario = Callable[[], Awaitable[None]]
SCENARIOS: dict[tuple[int, int], Scenario] = {}


def scenario(start: int, end: int) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[(start, end)] = fn
        return fn

    return register


@scenario(LOGIN, UNLINKED)
async def logged_in_in_transaction_mode() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool)
    assert client.mode == UNLINKED and client.server is None


@scenario(LOGIN, LINKED)
async def logged_in_in_session_mode() -> None:
    proxy, pool = memory_proxy(1, {"pool_mode": "session"})
    client = await memory_client(proxy, pool)
    assert client.mode == LINKED and client.server is not None


@scenario(LOGIN, ADMIN)
async def logged_in_to_the_admin_console() -> None:
    client = await console_client()
    assert client.mode == ADMIN and client.pool is None and client.server is None
    assert types_of(sent(client))[0] == "R" and types_of(sent(client)) == []
    client.data_received(m.query("SHOW VERSION"))  # every read goes to the console
    assert types_of(sent(client)) == ["T", "D", "C", "Z"]
    assert client.mode == ADMIN


@scenario(UNLINKED, LINKED)
async def a_query_links_an_idle_server() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool, keep=True)
    client.data_received(SELECT)
    assert client.mode == LINKED
    assert sent(client) == b""  # nothing answered yet: the server has it


@scenario(UNLINKED, WAITING)
async def no_idle_server_means_waiting() -> None:
    _, b = await two_clients_one_server()
    b.data_received(SELECT)
    assert b.mode == WAITING and b.server is None


@scenario(WAITING, LINKED)
async def a_released_server_goes_to_the_waiting_client() -> None:
    a, b = await two_clients_one_server()
    b.data_received(SELECT)
    server = linked_server(a)
    server.data_received(REPLY)
    assert types_of(sent(a)) == ["T", "D", "C", "Z"]
    assert a.mode == UNLINKED
    assert b.mode == LINKED and b.server is server


@scenario(WAITING, UNLINKED)
async def a_cancelled_wait_ends_a_simple_query() -> None:
    _, b = await two_clients_one_server()
    b.data_received(SELECT)
    assert b.cancel_waiting()
    assert b.mode == UNLINKED
    assert types_of(sent(b)) == ["E", "Z"]


@scenario(WAITING, SKIPPING)
async def a_cancelled_wait_skips_the_extended_unit() -> None:
    _, b = await two_clients_one_server()
    b.data_received(EXTENDED_NO_SYNC)
    assert b.mode == WAITING
    assert b.cancel_waiting()
    assert b.mode == SKIPPING
    assert types_of(sent(b)) == ["E"]


@scenario(SKIPPING, UNLINKED)
async def the_sync_ends_skipping() -> None:
    _, b = await two_clients_one_server()
    b.data_received(EXTENDED_NO_SYNC)
    b.cancel_waiting()
    sent(b)
    b.data_received(m.bind("", "", []) + m.execute())  # still the failed unit: dropped
    assert b.mode == SKIPPING and sent(b) == b""
    b.data_received(SYNC)
    assert b.mode == UNLINKED
    assert types_of(sent(b)) == ["Z"]


@scenario(LINKED, UNLINKED)
async def the_server_owing_nothing_is_released() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool, keep=True)
    client.data_received(SELECT)
    server = linked_server(client)
    server.data_received(REPLY)
    assert client.mode == UNLINKED and client.server is None
    assert pool.idle == [server]


@scenario(LINKED, SKIPPING)
async def a_server_lost_mid_extended_unit_skips_to_sync() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool, keep=True)
    client.data_received(EXTENDED_NO_SYNC)
    linked_server(client).connection_lost(None)
    assert client.mode == SKIPPING
    assert types_of(sent(client)) == ["E"]


async def _linked_server_lost_with_a_query_in_flight() -> None:
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool, keep=True)
    client.data_received(SELECT)
    linked_server(client).connection_lost(None)
    assert client.mode == UNLINKED and client.server is None
    assert types_of(sent(client)) == ["E", "Z"]  # the unit failed; the session goes on


def _closing(start: int) -> Scenario:
    async def lose_the_connection() -> None:
        proxy, pool = memory_proxy(1, {"pool_mode": "session"} if start == LOGIN else None)
        if start == LOGIN:
            client = ClientSession(proxy)  # type: ignore[arg-type]
            client.connection_made(MemoryTransport())  # type: ignore[arg-type]
        elif start in (WAITING, SKIPPING):
            _, client = await two_clients_one_server()
            client.data_received(EXTENDED_NO_SYNC)
            if start == SKIPPING:
                client.cancel_waiting()
        else:
            client = await memory_client(proxy, pool)
            if start == LINKED:
                client.data_received(SELECT)
        assert client.mode == start
        client.connection_lost(None)
        assert client.mode == CLOSED and client.server is None

    return lose_the_connection


for _start in (LOGIN, UNLINKED, WAITING, LINKED, SKIPPING):
    SCENARIOS[(_start, CLOSED)] = _closing(_start)


@scenario(ADMIN, CLOSED)
async def the_console_client_leaves() -> None:
    client = await console_client()
    sent(client)
    client.data_received(m.TERMINATE_MESSAGE)  # Terminate: the console is finished
    assert client.closed and client.mode == ADMIN
    client.connection_lost(None)
    assert client.mode == CLOSED


@pytest.mark.parametrize(
    "transition",
    sorted(SCENARIOS),
    ids=lambda t: f"{stream.MODE_NAMES[t[0]]}->{stream.MODE_NAMES[t[1]]}",
)
async def test_transition(transition: tuple[int, int]) -> None:
    await SCENARIOS[transition]()


async def test_a_server_lost_between_units_fails_only_the_query_in_flight() -> None:
    await _linked_server_lost_with_a_query_in_flight()


def test_the_scenarios_cover_the_table_exactly() -> None:
    assert set(SCENARIOS) == set(stream.TRANSITIONS)


def test_no_other_module_sets_the_mode() -> None:
    """h11's rule: every assignment of ``mode`` is in stream.py."""
    import pathlib

    root = pathlib.Path(stream.__file__).parent.parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "stream.py" and ".mode = " in path.read_text().replace("pool.mode", "")
    ]
    assert offenders == []
