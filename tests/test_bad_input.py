"""Hostile or broken client input: a clear FATAL (where the protocol allows one), then a close.

Never a crash, a hang or unbounded buffering, and the proxy keeps serving everyone else: every
test ends by running a normal psycopg query through the same proxy (``assert_serving``).

Every raw socket has a short timeout, so a proxy that hangs fails the test instead of stalling
the run (``socket.timeout`` / ``TimeoutError`` is the symptom of a hang).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.config import parse_config
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import DEFAULT_PROXY, MakeProxy, pg_server_url
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, rows_of

SOCK_TIMEOUT = 3.0  # no single read or write may take longer: a hang fails fast

_I32 = struct.Struct("!i")
GSSENC_REQUEST = m.gssenc_request()
PROTOCOL_3_2 = (3 << 16) | 2
PROTOCOL_2_0 = 2 << 16


# --- helpers ------------------------------------------------------------------------------------


def raw(proxy: ProxyThread, timeout: float = SOCK_TIMEOUT) -> RawClient:
    return RawClient(proxy.port, timeout=timeout)


def frame(type_: bytes, length: int, body: bytes = b"") -> bytes:
    """A message whose length field says ``length``, whatever the body really is."""
    return type_ + _I32.pack(length) + body


def startup_packet(version: int, body: bytes) -> bytes:
    payload = _I32.pack(version) + body
    return _I32.pack(len(payload) + 4) + payload


def read_to_eof(client: RawClient) -> list[tuple[str, bytes]]:
    """Every message until the proxy closes; a proxy that does not close times out here."""
    try:
        return client.read_all()
    except ConnectionResetError:
        # A reset is still a close; what was read before it is in the buffer.
        out = []
        while (msg := _parse_buffered(client)) is not None:
            out.append(msg)
        return out


def _parse_buffered(client: RawClient) -> tuple[str, bytes] | None:
    if len(client.buf) < 5:
        return None
    (length,) = _I32.unpack_from(client.buf, 1)
    if len(client.buf) < 1 + length:
        return None
    msg = (chr(client.buf[0]), client.buf[5 : 1 + length])
    client.buf = client.buf[1 + length :]
    return msg


def read_to_eof_or_ready(client: RawClient) -> list[tuple[str, bytes]]:
    out = []
    while (msg := client.read_message()) is not None:
        out.append(msg)
        if msg[0] == "Z":
            break
    return out


def fatal_fields(messages: list[tuple[str, bytes]]) -> dict[str, str]:
    """The single ErrorResponse, which must be the last thing sent and a FATAL one."""
    errors = [m.parse_error_fields(body) for type_, body in messages if type_ == "E"]
    assert len(errors) == 1, f"expected exactly one ErrorResponse, got {messages}"
    assert messages[-1][0] == "E", f"the FATAL must be the last message, got {messages}"
    fields = errors[0]
    assert fields.get("S") == "FATAL", fields
    assert fields.get("V") == "FATAL", fields
    assert fields.get("M"), fields
    return fields


def expect_fatal(client: RawClient, sqlstate: str, message: str | None = None) -> dict[str, str]:
    """Read to EOF: exactly one FATAL ``sqlstate`` (containing ``message``), then a close."""
    fields = fatal_fields(read_to_eof(client))
    assert fields["C"] == sqlstate, fields
    if message is not None:
        assert message in fields["M"], fields
    return fields


def assert_serving(proxy: ProxyThread, **dsn: Any) -> None:
    """A normal client still gets a correct answer, and nothing blew up in the proxy loop."""
    with psycopg.connect(proxy.dsn(**dsn), connect_timeout=5) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)
    assert not proxy.loop_errors, proxy.loop_errors


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def send_until_stalled(sock: socket.socket, limit: int, seconds: float = 3.0) -> int:
    """Push zeros until ``limit`` bytes, ``seconds`` or a 0.5 s stall; return bytes accepted.

    With back-pressure the kernel buffers (a few MB) fill and the send stalls; a peer that
    buffers everything in user space accepts the whole ``limit`` within the time.
    """
    chunk = b"\0" * (1 << 20)
    total = 0
    deadline = time.monotonic() + seconds
    sock.settimeout(0.5)
    try:
        while total < limit and time.monotonic() < deadline:
            total += sock.send(chunk)
    except (TimeoutError, BlockingIOError):
        pass
    return total


@pytest.fixture
def start_proxy(pg: PgCluster) -> Iterator[Callable[[dict[str, Any]], ProxyThread]]:
    """Start a proxy from a complete TOML-shaped dict (``make_proxy`` always adds ``"*"``)."""
    made: list[ProxyThread] = []

    def start(data: dict[str, Any]) -> ProxyThread:
        runner = ProxyThread(parse_config(data))
        made.append(runner)
        runner.start()
        return runner

    yield start
    for runner in reversed(made):
        runner.stop()


# --- before and during the startup packet -------------------------------------------------------


def test_http_request_instead_of_startup_packet(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        messages = read_to_eof(c)
    if messages:  # Postgres closes silently; a FATAL 08P01 is fine too
        fields = fatal_fields(messages)
        assert fields["C"] == "08P01"
        assert "invalid length of startup packet" in fields["M"]
    assert_serving(proxy)


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(_I32.pack(4) + _I32.pack(m.PROTOCOL_3_0), id="length-4"),
        pytest.param(_I32.pack(7) + _I32.pack(m.PROTOCOL_3_0), id="length-7"),
        pytest.param(_I32.pack(0), id="length-0"),
        pytest.param(_I32.pack(-1) + b"\0" * 8, id="negative"),
        pytest.param(_I32.pack(10001) + _I32.pack(m.PROTOCOL_3_0), id="length-10001"),
        pytest.param(_I32.pack(0x7FFFFFFF) + _I32.pack(m.PROTOCOL_3_0), id="length-2GB"),
    ],
)
def test_startup_packet_with_bad_length(proxy: ProxyThread, packet: bytes) -> None:
    with raw(proxy) as c:
        c.send(packet)
        expect_fatal(c, "08P01", "invalid length of startup packet")
    assert_serving(proxy)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"user\0postgres\0", id="no-final-nul"),
        pytest.param(b"user\0postgres", id="unterminated-value"),
        pytest.param(b"user\0postgres\0\0junk", id="bytes-after-terminator"),
        pytest.param(b"", id="version-only"),
    ],
)
def test_startup_packet_with_bad_layout(proxy: ProxyThread, body: bytes) -> None:
    with raw(proxy) as c:
        c.send(startup_packet(m.PROTOCOL_3_0, body))
        expect_fatal(c, "08P01")
    assert_serving(proxy)


def _v2_startup_packet() -> bytes:
    """A real protocol 2.0 StartupPacket: fixed 64/32/64/64/64-byte fields, no NUL list."""

    def fixed(value: bytes, size: int) -> bytes:
        return value.ljust(size, b"\0")

    body = (
        fixed(b"postgres", 64)  # database
        + fixed(b"postgres", 32)  # user
        + fixed(b"", 64)  # options
        + fixed(b"", 64)  # unused
        + fixed(b"", 64)  # tty
    )
    return startup_packet(PROTOCOL_2_0, body)


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(
            startup_packet(PROTOCOL_2_0, b"user\0postgres\0\0"),
            id="v3-layout",
        ),
        pytest.param(
            _v2_startup_packet(),
            id="v2-layout",
        ),
    ],
)
def test_protocol_2_is_rejected_as_unsupported(proxy: ProxyThread, packet: bytes) -> None:
    with raw(proxy) as c:
        c.send(packet)
        fields = expect_fatal(c, "0A000", "unsupported frontend protocol 2.0")
        assert "3.0" in fields["M"]
    assert_serving(proxy)


@pytest.mark.parametrize(
    ("version", "options", "negotiated"),
    [
        (PROTOCOL_3_2, b"", None),  # spoken as it is: no NegotiateProtocolVersion
        (PROTOCOL_3_2, b"_pq_.foo\0bar\0", PROTOCOL_3_2),  # the option is not understood
        ((3 << 16) | 9999, b"", PROTOCOL_3_2),  # libpq 19's "grease": the newest it speaks
    ],
)
def test_protocol_3_2_is_spoken_and_newer_is_negotiated_down(
    proxy: ProxyThread, version: int, options: bytes, negotiated: int | None
) -> None:
    params = b"user\0postgres\0database\0postgres\0" + options + b"\0"
    with raw(proxy) as c:
        c.send(startup_packet(version, params))
        messages = c.read_until_ready()
        if negotiated is None:
            assert messages[0][0] == "R", messages
        else:
            assert messages[0][0] == "v", messages
            newest, count = struct.unpack_from("!ii", messages[0][1], 0)
            assert newest == negotiated
            assert messages[0][1][8:] == (b"_pq_.foo\0" if options else b"")
            assert count == (1 if options else 0)
        types = [t for t, _ in messages]
        assert "E" not in types and types[-1] == "Z"
        keys = [b for t, b in messages if t == "K"]
        assert len(keys) == 1 and len(keys[0]) == 4 + 32  # a 3.2 cancel key: 32 bytes
        assert rows_of(c.query("select 6 * 7")) == [["42"]]
    assert_serving(proxy)


def test_protocol_3_0_keeps_its_4_byte_cancel_key(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.send(startup_packet(m.PROTOCOL_3_0, b"user\0postgres\0database\0postgres\0\0"))
        messages = c.read_until_ready()
        assert [t for t, _ in messages if t == "v"] == []
        keys = [b for t, b in messages if t == "K"]
        assert len(keys) == 1 and len(keys[0]) == 8


# --- startup parameters and routing -------------------------------------------------------------


def test_missing_user_is_28000(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.send(m.startup_message({"database": "postgres"}))
        expect_fatal(c, "28000", "no PostgreSQL user name specified")
    assert_serving(proxy)


@pytest.mark.parametrize("value", ["database", "true", "on", "1"])
def test_replication_connection_is_0A000(proxy: ProxyThread, value: str) -> None:
    with raw(proxy) as c:
        c.startup(replication=value)
        expect_fatal(c, "0A000", "replication")
    assert_serving(proxy)


def _known_only_config(pg: PgCluster) -> dict[str, Any]:
    return {
        "proxy": dict(DEFAULT_PROXY),
        "databases": {"known": {"url": f"{pg_server_url(pg)}/postgres"}},
    }


def test_unknown_database_is_3D000(
    pg: PgCluster, start_proxy: Callable[[dict[str, Any]], ProxyThread]
) -> None:
    p = start_proxy(_known_only_config(pg))
    with raw(p) as c:
        c.startup(database="x")
        expect_fatal(c, "3D000", 'database "x" does not exist')
    with raw(p) as c:  # no database parameter: it defaults to the user name
        c.send(m.startup_message({"user": "postgres"}))
        expect_fatal(c, "3D000", 'database "postgres" does not exist')
    assert_serving(p, dbname="known")


def test_unknown_database_through_psycopg(
    pg: PgCluster, start_proxy: Callable[[dict[str, Any]], ProxyThread]
) -> None:
    p = start_proxy(_known_only_config(pg))
    with pytest.raises(psycopg.OperationalError, match='database "nope" does not exist'):
        psycopg.connect(p.dsn(dbname="nope"), connect_timeout=5)
    assert_serving(p, dbname="known")


# --- encryption requests ------------------------------------------------------------------------


def test_ssl_request_is_refused_and_login_continues(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.send(m.ssl_request())
        assert c.read_byte() == b"N"
        c.login()
        assert rows_of(c.query("select 1")) == [["1"]]
    assert_serving(proxy)


def test_second_ssl_request_is_08P01(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.send(m.ssl_request())
        assert c.read_byte() == b"N"
        c.send(m.ssl_request())
        expect_fatal(c, "08P01")
    assert_serving(proxy)


def test_gssenc_then_ssl_request_then_login(proxy: ProxyThread) -> None:
    """libpq's gssencmode=prefer falls back to SSL on the same socket."""
    with raw(proxy) as c:
        c.send(GSSENC_REQUEST)
        assert c.read_byte() == b"N"
        c.send(m.ssl_request())
        assert c.read_byte() == b"N"
        c.login()
        assert rows_of(c.query("select 1")) == [["1"]]
    assert_serving(proxy)


def test_data_pipelined_after_ssl_request_is_08P01(proxy: ProxyThread) -> None:
    """CVE-2021-3935 class: bytes sent before the TLS handshake could be a MITM injection."""
    with raw(proxy) as c:
        c.send(m.ssl_request() + m.startup_message({"user": "postgres", "database": "postgres"}))
        first = c.read_byte()
        if first != b"N":  # Postgres answers N first, then the FATAL; the N is optional
            c.buf = first + c.buf
        messages = read_to_eof(c)
        assert [t for t, _ in messages] == ["E"], messages  # no authentication exchange
        fields = fatal_fields(messages)
        assert fields["C"] == "08P01"
        assert "unencrypted data after" in fields["M"]
    assert_serving(proxy)


# --- client_login_timeout -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"", id="silent"),
        pytest.param(_I32.pack(100) + _I32.pack(m.PROTOCOL_3_0) + b"user\0", id="partial"),
        pytest.param(m.ssl_request(), id="after-ssl-request"),
    ],
)
def test_login_timeout_disconnects_a_stalled_client(make_proxy: MakeProxy, opening: bytes) -> None:
    p = make_proxy(proxy={"client_login_timeout": 0.5})
    start = time.monotonic()
    with raw(p, timeout=5) as c:
        if opening:
            c.send(opening)
        if opening == m.ssl_request():
            assert c.read_byte() == b"N"
        expect_fatal(c, "57014", "canceling authentication due to timeout")
    assert time.monotonic() - start < 3
    assert_serving(p)


# --- passwords ----------------------------------------------------------------------------------

ALICE = {"alice": {"password": "secret"}}


def _auth_proxy(make_proxy: MakeProxy, pg: PgCluster, auth_type: str) -> ProxyThread:
    # alice exists only in the proxy; upstream, the pool logs in as postgres (trust).
    return make_proxy(
        proxy={"auth_type": auth_type},
        users=ALICE,
        databases={"*": {"url": pg_server_url(pg), "user": "postgres"}},
    )


async def _asyncpg_connect(p: ProxyThread, user: str, password: str | None) -> Any:
    return await asyncpg.connect(
        host=p.host, port=p.port, user=user, password=password, database="postgres", timeout=5
    )


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
async def test_wrong_password_and_unknown_user_are_28P01(
    make_proxy: MakeProxy, pg: PgCluster, auth_type: str
) -> None:
    p = _auth_proxy(make_proxy, pg, auth_type)
    with pytest.raises(asyncpg.InvalidPasswordError, match='for user "alice"') as wrong:
        await _asyncpg_connect(p, "alice", "wrong")
    assert wrong.value.sqlstate == "28P01"
    with pytest.raises(asyncpg.InvalidPasswordError, match='for user "mallory"') as unknown:
        await _asyncpg_connect(p, "mallory", "secret")
    assert unknown.value.sqlstate == "28P01"

    conn = await _asyncpg_connect(p, "alice", "secret")
    try:
        assert await conn.fetchval("select $1::int + 1", 41) == 42
    finally:
        await conn.close()
    with psycopg.connect(p.dsn(user="alice", password="secret"), connect_timeout=5) as pconn:
        assert pconn.execute("select 'ok'").fetchone() == ("ok",)
    assert not p.loop_errors, p.loop_errors


def test_wrong_md5_password_raw_fields(make_proxy: MakeProxy, pg: PgCluster) -> None:
    p = _auth_proxy(make_proxy, pg, "md5")
    with raw(p) as c:
        c.startup("alice")
        msg = c.read_message()
        assert msg is not None and msg[0] == "R"
        assert m.parse_authentication(msg[1])[0] == m.AUTH_MD5
        c.send(m.password_message(b"md5" + b"0" * 32 + b"\0"))
        expect_fatal(c, "28P01", 'password authentication failed for user "alice"')
    assert_serving(p, user="alice", password="secret")


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(frame(b"p", 70000), id="oversized-password-message"),
        pytest.param(frame(b"p", 3), id="password-length-below-4"),
        pytest.param(m.query("select 1"), id="query-instead-of-password"),
        pytest.param(m.password_message(b"no-terminator"), id="unterminated-password"),
    ],
)
def test_malformed_password_reply_is_08P01(
    make_proxy: MakeProxy, pg: PgCluster, reply: bytes
) -> None:
    p = _auth_proxy(make_proxy, pg, "md5")
    with raw(p) as c:
        c.startup("alice")
        msg = c.read_message()
        assert msg is not None and msg[0] == "R"
        c.send(reply)
        expect_fatal(c, "08P01")
    assert_serving(p, user="alice", password="secret")


async def test_unknown_user_under_trust_with_users_configured_is_28000(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    p = _auth_proxy(make_proxy, pg, "trust")
    with pytest.raises(
        asyncpg.InvalidAuthorizationSpecificationError, match='role "mallory" does not exist'
    ) as exc:
        await _asyncpg_connect(p, "mallory", None)
    assert exc.value.sqlstate == "28000"
    conn = await _asyncpg_connect(p, "alice", None)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
    assert not p.loop_errors, p.loop_errors


# --- after login --------------------------------------------------------------------------------

BAD_FRAMES = [
    pytest.param(frame(b"Y", 4), "invalid frontend message type", id="unknown-type"),
    pytest.param(frame(b"\0", 8), "invalid frontend message type", id="nul-type"),
    pytest.param(frame(b"Q", 3), "invalid message length", id="length-3"),
    pytest.param(frame(b"Q", -5), "invalid message length", id="negative-length"),
    pytest.param(frame(b"S", 20000), "invalid message length", id="sync-20000"),
    pytest.param(frame(b"X", 10001), "invalid message length", id="terminate-10001"),
    pytest.param(
        m.password_message(b"secret\0"), "invalid frontend message type", id="password-message"
    ),
    pytest.param(m.startup_message({"user": "postgres"}), None, id="second-startup"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_FRAMES)
def test_bad_message_after_login_is_08P01(
    proxy: ProxyThread, bad: bytes, message: str | None
) -> None:
    with raw(proxy) as c:
        c.login()
        c.send(bad)
        expect_fatal(c, "08P01", message)
    assert_serving(proxy)


@pytest.mark.parametrize(("bad", "message"), BAD_FRAMES[:4])
def test_bad_message_mid_transaction_does_not_leak_the_transaction(
    make_proxy: MakeProxy, bad: bytes, message: str | None
) -> None:
    p = make_proxy(proxy={"default_pool_size": 1})
    with raw(p) as c:
        c.login()
        out = c.query("begin; create temp table t_bad_input (v int)")
        assert out[-1] == ("Z", b"T")
        c.send(m.query("select 1") + bad)  # a good message, then garbage in the same send
        expect_fatal(c, "08P01", message)
    with raw(p) as c:  # the only server: it must come back rolled back
        c.login()
        out = c.query("select to_regclass('pg_temp.t_bad_input') is null")
        assert rows_of(out) == [["t"]]
        assert out[-1] == ("Z", b"I")
    assert_serving(p)


def test_sync_and_flush_without_a_server_are_answered(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.login()
        c.send(m.FLUSH_MESSAGE + m.SYNC_MESSAGE)
        assert c.read_message() == ("Z", b"I")
        c.send(m.SYNC_MESSAGE + m.SYNC_MESSAGE)
        assert c.read_message() == ("Z", b"I")
        assert c.read_message() == ("Z", b"I")
        assert rows_of(c.query("select 1")) == [["1"]]
    assert_serving(proxy)


def test_terminate_closes_quietly(proxy: ProxyThread) -> None:
    with raw(proxy) as c:
        c.login()
        c.send(m.TERMINATE_MESSAGE)
        assert read_to_eof(c) == []
    with raw(proxy) as c:  # Terminate pipelined right behind the startup packet
        c.send(m.startup_message({"user": "postgres", "database": "postgres"}))
        c.send(m.TERMINATE_MESSAGE)
        messages = read_to_eof(c)
        assert messages and messages[-1][0] == "Z" and "E" not in [t for t, _ in messages]
    assert_serving(proxy)


def test_malformed_body_forwarded_to_the_server(proxy: ProxyThread) -> None:
    """A Query with no string: the server rejects it; the client hears 08P01, nobody else does."""
    with raw(proxy) as c:
        c.login()
        c.send(frame(b"Q", 4))
        messages = read_to_eof_or_ready(c)
        errors = [m.parse_error_fields(b) for t, b in messages if t == "E"]
        assert errors and errors[0]["C"] == "08P01", messages
    assert_serving(proxy)


# --- huge claimed lengths -----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["linked", "waiting"])
def test_huge_query_header_then_close_leaves_no_dirty_server(
    make_proxy: MakeProxy, state: str
) -> None:
    """A Query claiming 1 GB - 1 bytes, a few bytes of it, then the client leaves."""
    p = make_proxy(proxy={"default_pool_size": 1})
    holder = None
    if state == "waiting":  # the only server is busy: the proxy must queue, not allocate
        holder = psycopg.connect(p.dsn(), connect_timeout=5)
        holder.execute("select 1")  # opens a transaction, which keeps the server
    try:
        with raw(p) as c:
            c.login()
            c.send(frame(b"Q", 0x3FFFFFFF, b"select 1; -- "))
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
    for i in range(20):
        with psycopg.connect(p.dsn(), connect_timeout=5) as conn:
            assert conn.execute("select %s::int * 2", (i,)).fetchone() == (2 * i,)
    with raw(p) as c:
        c.login()
        out = c.query("select 1")
        assert rows_of(out) == [["1"]] and out[-1] == ("Z", b"I")
    assert_serving(p)


def test_streaming_while_waiting_for_a_server_is_bounded(make_proxy: MakeProxy) -> None:
    p = make_proxy(proxy={"default_pool_size": 1})
    with psycopg.connect(p.dsn(), connect_timeout=5) as holder:
        holder.execute("select 1")  # holds the only server
        with raw(p) as c:
            c.login()
            c.send(frame(b"Q", 0x3FFFFFFF))
            accepted = send_until_stalled(c.sock, 64 << 20)
        holder.rollback()
    assert accepted < 32 << 20, f"proxy accepted {accepted} bytes without back-pressure"
    assert_serving(p)


def test_streaming_while_login_waits_for_a_server_is_bounded(make_proxy: MakeProxy) -> None:
    p = make_proxy(proxy={"default_pool_size": 1})
    with psycopg.connect(p.dsn(), connect_timeout=5) as holder:
        holder.execute("select 1")  # holds the only server
        with raw(p) as c:
            # A startup GUC the pool has not validated yet: login needs a server, and waits.
            c.startup(statement_timeout="123457")
            c.send(frame(b"Q", 0x3FFFFFFF))
            accepted = send_until_stalled(c.sock, 64 << 20)
        holder.rollback()
    assert accepted < 32 << 20, f"proxy accepted {accepted} bytes without back-pressure"
    assert_serving(p)


def test_large_message_skipped_after_wait_timeout_does_not_hang(make_proxy: MakeProxy) -> None:
    p = make_proxy(proxy={"default_pool_size": 1, "query_wait_timeout": 0.5})
    with psycopg.connect(p.dsn(), connect_timeout=5) as holder:
        holder.execute("select 1")  # holds the only server past the wait timeout
        with raw(p, timeout=2.0) as c:
            c.login()
            big = b"x" * (2 << 20)
            pipeline = (
                m.parse("", "select length($1::bytea)")
                + m.bind("", "", [big])
                + m.execute()
                + m.SYNC_MESSAGE
            )
            send_errors: list[BaseException] = []

            def send() -> None:
                try:
                    c.send(pipeline)
                except OSError as exc:
                    send_errors.append(exc)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            try:
                out = c.read_until_ready()
            finally:
                sender.join(SOCK_TIMEOUT + 1)
            errors = [m.parse_error_fields(b) for t, b in out if t == "E"]
            assert [e["C"] for e in errors] == ["57014"], out
            assert out[-1] == ("Z", b"I")
            assert not send_errors
            holder.rollback()
            assert rows_of(c.query("select 1")) == [["1"]]
    assert_serving(p)


# --- max_client_conn ----------------------------------------------------------------------------


def test_too_many_clients_is_53300_and_the_others_keep_working(make_proxy: MakeProxy) -> None:
    p = make_proxy(proxy={"max_client_conn": 3})
    conns = [psycopg.connect(p.dsn(), connect_timeout=5, autocommit=True) for _ in range(3)]
    try:
        with raw(p) as c:
            c.startup()
            expect_fatal(c, "53300", "sorry, too many clients already")
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(p.dsn(), connect_timeout=5)
        for i, conn in enumerate(conns):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    finally:
        for conn in conns:
            conn.close()
    wait_until(lambda: p.call(lambda proxy: proxy.client_count) == 0)
    assert_serving(p)


# --- SCRAM exchanges cut short or replayed -------------------------------------------------------


def _scram_proxy(make_proxy: MakeProxy, pg: PgCluster) -> ProxyThread:
    return make_proxy(
        proxy={"auth_type": "scram-sha-256"},
        users=ALICE,
        databases={"*": {"url": pg_server_url(pg), "user": "postgres"}},
    )


def _sasl_start(c: RawClient) -> None:
    c.startup("alice")
    msg = c.read_message()
    assert msg is not None and msg[0] == "R"
    assert m.parse_authentication(msg[1])[0] == m.AUTH_SASL


def _client_first(c: RawClient, nonce: bytes = b"rawclientnonce") -> bytes:
    """Send client-first-message; return the combined nonce from server-first-message."""
    c.send(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=" + nonce))
    msg = c.read_message()
    assert msg is not None and msg[0] == "R", msg
    code, data = m.parse_authentication(msg[1])
    assert code == m.AUTH_SASL_CONTINUE
    return data.split(b",")[0][2:]


SASL_NAME = b"SCRAM-SHA-256\0"


@pytest.mark.parametrize(
    ("first", "final"),
    [
        # SASLInitialResponse whose inner length promises more than the message holds
        pytest.param(m.message(m.PASSWORD, SASL_NAME + _I32.pack(100) + b"n,,n="), None,
                     id="initial-response-inner-length"),
        pytest.param(m.message(m.PASSWORD, SASL_NAME[:-1]), None, id="mechanism-unterminated"),
        pytest.param(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r="), None,
                     id="client-first-without-nonce"),
        pytest.param(m.sasl_initial_response("SCRAM-SHA-256", b"n,"), None,
                     id="client-first-cut-after-flag"),
        pytest.param(None, b"c=biws,r=", id="client-final-cut-at-nonce"),
        pytest.param(None, b"c=biws,r={nonce},p=", id="client-final-empty-proof"),
        pytest.param(None, b"c=bi", id="client-final-cut-in-binding"),
    ],
)  # fmt: skip
def test_truncated_scram_messages_are_08P01(
    make_proxy: MakeProxy, pg: PgCluster, first: bytes | None, final: bytes | None
) -> None:
    p = _scram_proxy(make_proxy, pg)
    with raw(p) as c:
        _sasl_start(c)
        if first is not None:
            c.send(first)
        else:
            nonce = _client_first(c)
            assert final is not None
            c.send(m.password_message(final.replace(b"{nonce}", nonce)))
        expect_fatal(c, "08P01")
    assert_serving(p, user="alice", password="secret")


def test_replayed_scram_nonce_is_08P01(make_proxy: MakeProxy, pg: PgCluster) -> None:
    """A client-final-message carrying another exchange's nonce (a replay) is refused before
    its proof is even checked, as Postgres does ("invalid SCRAM response")."""
    import base64

    p = _scram_proxy(make_proxy, pg)
    with raw(p) as c:
        _sasl_start(c)
        old_nonce = _client_first(c, b"samenonce")
    with raw(p) as c:
        _sasl_start(c)
        new_nonce = _client_first(c, b"samenonce")
        assert new_nonce != old_nonce  # the server's half is fresh every time
        proof = base64.b64encode(bytes(32))
        c.send(m.password_message(b"c=biws,r=" + old_nonce + b",p=" + proof))
        expect_fatal(c, "08P01", "invalid SCRAM response")
    assert_serving(p, user="alice", password="secret")
