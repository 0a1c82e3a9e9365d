"""A client's prepared statements over servers' caches, with bytes alone: renaming, injected
Parses, eviction, duplicates, Close, DEALLOCATE and the unnamed statement."""

from __future__ import annotations

import pytest

from pgproxy import prepared
from pgproxy.backend import ServerConnection
from pgproxy.client.statements import ClientStatements
from pgproxy.pool.pool import Pool
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.testing.memory import memory_proxy

TEXT = "SELECT $1::int"
TAIL = m.parse("", TEXT, [23])[6:]  # the Parse body after the (empty) name
SERVER_NAME = prepared.statement_for(TAIL).server_name


async def servers(count: int, limit: int | None = None) -> tuple[Pool, list[ServerConnection]]:
    _, pool = memory_proxy(count, {"max_prepared_statements": limit} if limit else None)
    return pool, sorted(pool.idle, key=lambda server: server.pid)


def bind_of(name: str) -> tuple[bytes, int, int]:
    """A Bind body of statement ``name``, and where the name stands in it."""
    body = m.bind("", name, [b"1"])[5:]
    return body, 1, 1 + len(name) + 1


def swallowed(server: ServerConnection, *types: int) -> list[bool]:
    return [server.replies.reply(t) for t in types]


async def test_a_named_statement_is_known_to_servers_by_a_proxy_wide_name() -> None:
    _, (a, b) = await servers(2)
    stmts = ClientStatements()
    assert stmts.parse(a, "s1", TAIL) == m.parse(SERVER_NAME, TEXT, [23])
    assert swallowed(a, m.PARSE_COMPLETE) == [False]  # the client's own ParseComplete
    body, at, rest = bind_of("s1")
    assert stmts.bind(a, body, "s1", at, rest) == m.bind("", SERVER_NAME, [b"1"])
    # Server b never saw it: the Parse goes first, and its ParseComplete is the proxy's.
    assert stmts.bind(b, body, "s1", at, rest) == m.parse(SERVER_NAME, TEXT, [23]) + m.bind(
        "", SERVER_NAME, [b"1"]
    )
    assert swallowed(b, m.PARSE_COMPLETE) == [True]
    assert stmts.describe(b, m.describe("S", "s1")[5:], "s1") == m.describe("S", SERVER_NAME)


async def test_two_clients_share_one_server_copy_of_the_same_statement() -> None:
    _, (a,) = await servers(1)
    one, two = ClientStatements(), ClientStatements()
    one.parse(a, "mine", TAIL)
    # Re-parsing a name the server holds: Close + Parse, so the server answers itself.
    assert two.parse(a, "yours", TAIL) == m.close("S", SERVER_NAME) + m.parse(
        SERVER_NAME, TEXT, [23]
    )
    assert swallowed(a, m.PARSE_COMPLETE, m.CLOSE_COMPLETE, m.PARSE_COMPLETE) == [
        False,
        True,
        False,
    ]


async def test_the_least_recently_used_statement_is_evicted_at_the_limit() -> None:
    _, (a,) = await servers(1, limit=2)
    stmts = ClientStatements()
    tails = [m.parse("", f"SELECT {i}", [])[6:] for i in range(3)]
    names = [prepared.statement_for(t).server_name for t in tails]
    stmts.parse(a, "s0", tails[0])
    stmts.parse(a, "s1", tails[1])
    assert stmts.parse(a, "s2", tails[2]) == m.close("S", names[0]) + m.parse(
        names[2], "SELECT 2", []
    )
    # s0 is still the client's: using it again brings it back, evicting s1.
    body, at, rest = bind_of("s0")
    out = stmts.bind(a, body, "s0", at, rest)
    assert out is not None and out.startswith(
        m.close("S", names[1]) + m.parse(names[0], "SELECT 0", [])
    )


async def test_a_duplicate_name_gets_the_servers_error_in_the_clients_words() -> None:
    _, (a,) = await servers(1)
    stmts = ClientStatements()
    stmts.parse(a, "s1", TAIL)
    stmts.parse(a, "s1", TAIL)
    unit = a.flow.sent
    server_error = {
        "S": "ERROR",
        "C": "42P05",
        "M": f'prepared statement "{SERVER_NAME}" already exists',
    }
    assert a.replies.reword(server_error, unit) == {
        **server_error,
        "M": 'prepared statement "s1" already exists',
    }


async def test_close_forgets_the_clients_name_but_the_server_keeps_its_copy() -> None:
    _, (a,) = await servers(1)
    stmts = ClientStatements()
    stmts.parse(a, "s1", TAIL)
    stmts.close(a, ord("S"), "s1")
    assert "s1" not in stmts.named and SERVER_NAME in a.statements
    body, at, rest = bind_of("s1")
    assert stmts.bind(a, body, "s1", at, rest) is None  # unknown: the server says 26000


async def test_deallocate_removes_the_proxy_named_copy() -> None:
    _, (a, b) = await servers(2)
    stmts = ClientStatements()
    stmts.parse(a, "s1", TAIL)
    assert stmts.deallocate(a, "nope") is None
    assert stmts.deallocate(b, "s1") == m.parse(SERVER_NAME, "", []) + m.query(
        f'DEALLOCATE "{SERVER_NAME}"'
    )
    assert "s1" not in stmts.named and SERVER_NAME not in b.statements


async def test_the_unnamed_statement_follows_the_client_to_another_server() -> None:
    _, (a, b) = await servers(2)
    stmts, other = ClientStatements(), ClientStatements()
    assert stmts.parse(a, "", TAIL) is None  # forwarded as it is
    other.parse(b, "", m.parse("", "SELECT 2", [])[6:])
    body = m.bind("", "", [b"1"])[5:]
    assert stmts.bind(a, body, "", 1, 2) is None  # a holds this very Parse
    assert stmts.bind(b, body, "", 1, 2) == m.message(m.PARSE, b"\0" + TAIL) + m.message(
        m.BIND, body
    )
    stmts.close(b, ord("S"), "")
    assert stmts.bind(b, body, "", 1, 2) is None  # neither has one: the server says 26000
    # The client has none but the server holds another client's: it must not run that one.
    other.parse(b, "", m.parse("", "SELECT 2", [])[6:])
    b.flow.client_message(m.SYNC)
    assert stmts.bind(b, body, "", 1, 2) == m.close("S", "") + m.message(m.BIND, body)


async def test_too_many_statements_is_a_fatal_error() -> None:
    _, (a,) = await servers(1)
    stmts = ClientStatements()
    stmts.named = {
        str(i): prepared.statement_for(TAIL) for i in range(prepared.MAX_CLIENT_STATEMENTS)
    }
    with pytest.raises(PgError) as caught:
        stmts.parse(a, "one more", TAIL)
    assert caught.value.sqlstate == errors.PROGRAM_LIMIT_EXCEEDED and caught.value.fatal
