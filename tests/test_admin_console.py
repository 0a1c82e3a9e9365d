"""The admin console's wire side and its data, with bytes alone (no sockets, no Postgres).

A real :class:`~pgproxy.app.Proxy` with in-memory clients and servers
(``pgproxy.testing.memory``) is the console's host: its snapshots are the real thing. Drivers
and real clusters are ``test_admin.py``'s.
"""

from __future__ import annotations

import json
import struct
from decimal import Decimal

import pytest

from pgproxy.admin import commands, views
from pgproxy.admin.commands import ADMIN, STATS
from pgproxy.admin.console import Console
from pgproxy.admin.snapshot import merge
from pgproxy.app import Proxy
from pgproxy.config import ConfigError, parse_config
from pgproxy.protocol import messages as m
from pgproxy.testing.memory import memory_client, memory_proxy

SYNC = m.SYNC_MESSAGE


def messages(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def types(data: bytes) -> str:
    return "".join(t for t, _ in messages(data))


def error(data: bytes) -> dict[str, str]:
    [body] = [b for t, b in messages(data) if t == "E"]
    return m.parse_error_fields(body)


def text_rows(data: bytes) -> list[list[str | None]]:
    rows = []
    for t, body in messages(data):
        if t == "D":
            (n,), pos, row = struct.unpack_from("!h", body), 2, []
            for _ in range(n):
                (size,) = struct.unpack_from("!i", body, pos)
                pos += 4
                row.append(None if size < 0 else body[pos : pos + size].decode())
                pos += max(size, 0)
            rows.append(row)
    return rows


async def console(role: str = ADMIN) -> tuple[Console, Proxy]:
    proxy, _ = memory_proxy(2)
    return Console(proxy, "admin", role), proxy


# --- simple query ----------------------------------------------------------------------------


async def test_a_show_answers_rows_and_ready() -> None:
    con, _ = await console()
    out = con.feed(m.query("show version;"))
    assert types(out) == "TDCZ"
    assert text_rows(out) == [["pgproxy " + commands.version()]]
    assert messages(out)[-2] == ("C", b"SHOW\0")


async def test_commands_are_case_insensitive_and_take_quoted_words() -> None:
    con, _ = await console()
    for text in ("SHOW POOLS", "show Pools ;", '  SHOW "pools"', "select pools"):
        assert types(con.feed(m.query(text))) == "TDDCZ", text  # bench pool + the console's


async def test_an_unknown_command_fails_as_pgbouncer_says() -> None:
    con, _ = await console()
    out = con.feed(m.query("SHOW NOTHING"))
    assert types(out) == "EZ"
    assert error(out)["C"] == "08P01"
    assert error(out)["M"] == "invalid command 'SHOW NOTHING', use SHOW HELP;"
    assert types(con.feed(m.query("SHOW POOLS POOLS POOLS"))) == "EZ"


async def test_an_empty_query_is_an_empty_query_response() -> None:
    con, _ = await console()
    assert types(con.feed(m.query(" ; "))) == "IZ"


async def test_help_is_a_notice() -> None:
    con, _ = await console()
    out = con.feed(m.query("SHOW HELP"))
    assert types(out) == "NCZ"
    assert "SHOW LISTENERS" in m.parse_error_fields(messages(out)[0][1])["M"]


async def test_what_drivers_send_on_their_own_is_harmless() -> None:
    con, _ = await console(STATS)
    assert types(con.feed(m.query("BEGIN"))) == "CZ"
    assert types(con.feed(m.query("SET extra_float_digits = 3"))) == "NCZ"
    assert types(con.feed(m.query("set DateStyle to 'ISO'"))) == "NCZ"
    assert text_rows(con.feed(m.query("SHOW client_encoding"))) == [["UTF8"]]
    assert messages(con.feed(m.query("COMMIT")))[0] == ("C", b"COMMIT\0")


async def test_stats_users_may_only_show() -> None:
    con, _ = await console(STATS)
    assert types(con.feed(m.query("SHOW STATS"))).startswith("TD")
    for text in ("RELOAD", "PAUSE", "KILL app", "SHUTDOWN", "SET default_pool_size = 3"):
        out = con.feed(m.query(text))
        assert types(out) == "EZ", text
        assert error(out)["C"] == "42501", text


async def test_suspend_is_not_pgproxys_way_to_restart() -> None:
    con, _ = await console()
    out = con.feed(m.query("SUSPEND"))
    assert error(out)["C"] == "0A000" and "not supported" in error(out)["M"]


async def test_control_commands_need_a_valid_argument() -> None:
    con, _ = await console()
    for text in ("KILL_CLIENT twelve", "DISABLE", "SHUTDOWN NOW"):
        assert error(con.feed(m.query(text)))["C"] == "08P01", text  # PgBouncer's "invalid"


async def test_reload_reports_why_it_failed() -> None:
    con, proxy = await console()
    out = con.feed(m.query("RELOAD"))
    assert error(out)["C"] == "F0000" and "RELOAD failed" in error(out)["M"]

    def bad() -> object:
        raise ConfigError("proxy.pool_mode: must be one of 'session', 'transaction'")

    proxy.loader = bad  # type: ignore[assignment]
    assert "proxy.pool_mode" in error(con.feed(m.query("RELOAD")))["M"]
    bigger = parse_config({"proxy": {"default_pool_size": 7}})
    proxy.loader = lambda: bigger
    assert types(con.feed(m.query("RELOAD"))) == "CZ"
    assert proxy.config is bigger


# --- extended protocol ------------------------------------------------------------------------


async def test_parse_describe_bind_execute_in_text() -> None:
    con, _ = await console()
    out = con.feed(
        m.parse("s", "SHOW LISTS", [])
        + m.describe("S", "s")
        + m.bind("", "s", [])
        + m.describe("P", "")
        + m.execute()
        + SYNC
    )
    assert types(out) == "1tT2T" + "D" * 14 + "CZ"
    assert text_rows(out)[0] == ["databases", "2"]


async def test_execute_honours_max_rows_and_suspends() -> None:
    con, _ = await console()
    out = con.feed(m.parse("", "SHOW LISTS", []) + m.bind("", "", []) + m.execute("", 5))
    assert types(out) == "12DDDDDs"
    assert types(con.feed(m.execute("", 5))) == "DDDDDs"
    assert types(con.feed(m.execute("", 5) + SYNC)) == "DDDDCZ"
    # Sync ended the portal (and its implicit transaction).
    assert error(con.feed(m.execute("", 1) + SYNC))["C"] == "34000"


async def test_an_error_skips_to_sync() -> None:
    con, _ = await console()
    out = con.feed(
        m.parse("", "SHOW NOTHING", [])
        + m.bind("", "", [])
        + m.execute()
        + m.query("SHOW VERSION")  # skipped too, as Postgres does
        + SYNC
    )
    assert types(out) == "EZ"
    assert types(con.feed(m.query("SHOW VERSION"))) == "TDCZ"  # and the session goes on


async def test_statement_and_portal_rules() -> None:
    con, _ = await console()
    assert types(con.feed(m.parse("a", "SHOW STATE", []) + SYNC)) == "1Z"
    assert error(con.feed(m.parse("a", "SHOW STATE", []) + SYNC))["C"] == "42P05"
    assert error(con.feed(m.bind("", "nope", []) + SYNC))["C"] == "26000"
    assert error(con.feed(m.bind("", "a", [b"1"]) + SYNC))["C"] == "08P01"  # no parameters
    assert error(con.feed(m.describe("P", "nope") + SYNC))["C"] == "34000"
    out = con.feed(m.bind("p", "a", []) + m.bind("p", "a", []) + SYNC)
    assert types(out) == "2EZ" and error(out)["C"] == "42P03"
    out = con.feed(m.close("S", "a") + m.close("S", "never") + m.message(m.FLUSH) + SYNC)
    assert types(out) == "33Z"
    assert error(con.feed(m.bind("", "a", []) + SYNC))["C"] == "26000"  # closed
    # A simple Query replaces the unnamed statement.
    con.feed(m.parse("", "SHOW STATE", []) + SYNC)
    con.feed(m.query("SHOW VERSION"))
    assert error(con.feed(m.bind("", "", []) + SYNC))["C"] == "26000"


async def test_commands_without_rows_describe_as_no_data() -> None:
    con, _ = await console()
    out = con.feed(m.parse("", "BEGIN", []) + m.describe("S", "") + m.bind("", "", []))
    out += con.feed(m.execute() + m.parse("", "", []) + m.bind("", "", []) + m.execute() + SYNC)
    assert types(out) == "1tn2C12IZ"


async def test_binary_results_for_every_column_type() -> None:
    """asyncpg asks for binary results: int4, int8, numeric and text as Postgres sends them."""
    proxy, pool = memory_proxy(1)
    client = await memory_client(proxy, pool)
    pool.stats.bytes_sent = 123_456_789_012  # numeric: several base-10000 digits
    con = Console(proxy, "admin", ADMIN)
    out = con.feed(
        m.parse("", "SHOW STATS_TOTALS", []) + m.bind("", "", [], [1]) + m.execute() + SYNC
    )
    [row] = [r for r in _binary_rows(out) if r[0] == b"bench"]
    assert _numeric(row[5]) == Decimal(123_456_789_012)  # bytes_sent
    assert _numeric(row[12]) == 1  # client_login_count
    assert _numeric(row[1]) == 0
    out = con.feed(m.parse("", "SHOW CLIENTS", []) + m.bind("", "", [], [1]) + m.execute() + SYNC)
    [row] = [r for r in _binary_rows(out) if r[2] == b"bench"]
    assert struct.unpack("!i", row[20])[0] == client.vpid  # id, int4
    out = con.feed(m.parse("", "SHOW LISTS", []) + m.bind("", "", [], [0, 1]) + m.execute() + SYNC)
    assert _binary_rows(out)[0] == [b"databases", struct.pack("!i", 2)]
    out = con.feed(m.parse("", "SHOW LISTS", []) + m.bind("", "", [], [0, 1, 0]) + SYNC)
    assert error(out)["C"] == "08P01"  # three formats for two columns


def _binary_rows(data: bytes) -> list[list[bytes]]:
    rows = []
    for t, body in messages(data):
        if t == "D":
            (n,), pos, row = struct.unpack_from("!h", body), 2, []
            for _ in range(n):
                (size,) = struct.unpack_from("!i", body, pos)
                row.append(body[pos + 4 : pos + 4 + max(size, 0)])
                pos += 4 + max(size, 0)
            rows.append(row)
    return rows


def _numeric(data: bytes) -> Decimal:
    ndigits, weight, sign, _ = struct.unpack_from("!hhHh", data)
    digits = struct.unpack_from(f"!{ndigits}h", data, 8)
    value = sum(Decimal(d) * Decimal(10000) ** (weight - i) for i, d in enumerate(digits))
    return -value if sign == 0x4000 else value


async def test_bad_input_is_fatal() -> None:
    con, _ = await console()
    out = con.feed(m.message(ord("p"), b"secret\0"))  # no such message after login
    assert types(out) == "E" and error(out)["S"] == "FATAL" and con.finished
    con, _ = await console()
    assert types(con.feed(m.message(m.QUERY, b"SHOW VERSION"))) == "E"  # no terminator
    assert con.finished
    con, _ = await console()
    assert con.feed(m.TERMINATE_MESSAGE) == b"" and con.finished


async def test_messages_may_arrive_in_pieces() -> None:
    con, _ = await console()
    data = m.query("SHOW STATE") + m.parse("", "SHOW VERSION", []) + SYNC
    out = b"".join(con.feed(data[i : i + 3]) for i in range(0, len(data), 3))
    assert types(out) == "TDDDCZ1Z"


# --- snapshots --------------------------------------------------------------------------------


async def test_snapshots_of_several_processes_merge_exactly() -> None:
    """Two proxies (as two workers) with traffic: the merged snapshot adds counts and
    combines the periods so that averages are those of all the traffic together."""
    snaps = []
    for transactions in (3, 5):
        proxy, pool = memory_proxy(1)
        client = await memory_client(proxy, pool)
        for _ in range(transactions):
            client.data_received(m.query("SELECT 1"))
            server = client.server
            assert server is not None
            server.data_received(m.command_complete("SELECT 1") + m.ready_for_query())
        pool.stats.xact_seconds = transactions / 1000  # 1 ms each
        proxy.periods.roll([pool], proxy.periods._read_at + 2.0)  # a 2 s period
        snaps.append(json.loads(json.dumps(proxy.snapshot())))  # as another process sends it
    merged = merge(snaps)
    assert merged["processes"] == 2
    [bench] = [p for p in merged["pools"] if p["database"] == "bench"]
    assert bench["cl_active"] == 2 and bench["sv_idle"] == 2
    assert bench["stats"]["xact_count"] == 8
    [stats] = [r for r in views.TABLES["stats_averages"].rows(merged) if r[0] == "bench"]
    assert stats[2] == 4  # xact_count: (3 + 5) / 2 s
    assert stats[6] == 1000  # xact_time: 8000 µs / 8 transactions
    ids = [c["id"] for c in merged["clients"]]
    assert len(ids) == 2
    [lists] = [views.TABLES["lists"].rows(merged)]
    assert ("used_clients", 2) in lists
    assert ("pools", 2) in lists and ("databases", 2) in lists  # bench, the console's: once


def test_console_names_are_never_routed_upstream() -> None:
    for name in ("pgbouncer", "pgproxy"):
        with pytest.raises(ConfigError, match=f"databases.{name}: .*admin console"):
            parse_config({"databases": {name: {"url": "postgresql://h/db"}}})
    config = parse_config({"databases": {"*": {"url": "postgresql://h"}}})
    assert config.database_for("pgbouncer") is None and config.database_for("app") is not None


def test_admin_and_stats_users_accept_lists_and_pgbouncer_strings() -> None:
    config = parse_config({"proxy": {"admin_users": "alice, bob", "stats_users": ["carol"]}})
    assert config.proxy.admin_users == ("alice", "bob")
    assert (
        commands.console_role(config.proxy.admin_users, config.proxy.stats_users, "carol") == STATS
    )
    with pytest.raises(ConfigError, match=r"proxy.admin_users\[0\]: must be a string"):
        parse_config({"proxy": {"admin_users": [1]}})
    with pytest.raises(ConfigError, match=r"proxy\.stats_period: must be >= 1"):
        parse_config({"proxy": {"stats_period": 0}})
