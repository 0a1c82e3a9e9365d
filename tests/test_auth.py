"""Authentication in both directions, driven against each other over in-memory channels.

The proxy's server side (``authenticate_client``) and client side (``authenticate_upstream``)
talk to each other, to hand-made peers that misbehave, and to scramp, an independent SCRAM
implementation. No database is needed; PBKDF2 runs only for module-level fixtures and cached keys.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
import scramp  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.auth import scram, scram_client, scram_server
from pgproxy.auth.frontend import ClientAuthResult, authenticate_client
from pgproxy.auth.upstream import authenticate_upstream
from pgproxy.protocol import framing
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError

T = TypeVar("T")

USER = "alice"
PASSWORD = "correct horse"
WRONG = "battery staple"
MD5_SECRET = "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()
SALT = b"pgproxy-tests-16"
# Built with scramp (independent of pgproxy), in the format Postgres stores in pg_authid.
_SALT, _STORED, _SERVER, _ITER = scramp.ScramMechanism().make_auth_info(
    PASSWORD, iteration_count=4096, salt=SALT
)
SCRAM_SECRET = "SCRAM-SHA-256${}:{}${}:{}".format(
    _ITER, *(base64.b64encode(x).decode() for x in (_SALT, _STORED, _SERVER))
)
SECRETS = {"plain": PASSWORD, "md5": MD5_SECRET, "scram": SCRAM_SECRET}


# --- an in-memory connection pair ----------------------------------------------------------------


class QueueChannel:
    """One end of a pipe of framed messages; ``None`` in the queue means EOF."""

    def __init__(self, inbox: asyncio.Queue[tuple[int, bytes] | None]) -> None:
        self.inbox = inbox
        self.peer: QueueChannel | None = None
        self.sent: list[tuple[int, bytes]] = []

    async def read_message(self, max_length: int) -> tuple[int, bytes]:
        item = await self.inbox.get()
        if item is None:
            raise ConnectionError("peer closed")
        if len(item[1]) + 4 > max_length:
            raise m.ProtocolError(f"invalid message length {len(item[1]) + 4}")
        return item

    def write(self, data: bytes) -> None:
        assert self.peer is not None
        pos = 0
        while pos < len(data):
            length = framing.read_length(data, pos + 1)
            msg = (data[pos], data[pos + 5 : pos + 1 + length])
            self.sent.append(msg)
            self.peer.inbox.put_nowait(msg)
            pos += 1 + length

    def close(self) -> None:
        assert self.peer is not None
        self.peer.inbox.put_nowait(None)


def channel_pair() -> tuple[QueueChannel, QueueChannel]:
    a, b = QueueChannel(asyncio.Queue()), QueueChannel(asyncio.Queue())
    a.peer, b.peer = b, a
    return a, b


async def timed(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, 2)


async def login(
    method: str, secret: str | None, password: str | None, user: str = USER
) -> tuple[ClientAuthResult | BaseException, BaseException | None, QueueChannel]:
    """Run both sides against each other, as the proxy would: error or AuthenticationOk."""
    server_chan, client_chan = channel_pair()

    async def serve() -> ClientAuthResult:
        try:
            result = await authenticate_client(server_chan, method, user, secret)
        except PgError as e:
            server_chan.write(m.error_response(e.fields()))
            raise
        server_chan.write(m.authentication_ok())
        return result

    async def connect() -> None:
        try:
            await authenticate_upstream(client_chan, user, password)
        except BaseException:
            client_chan.close()
            raise

    server_res, client_res = await timed(asyncio.gather(serve(), connect(), return_exceptions=True))
    return server_res, client_res, server_chan


def assert_pg_error(exc: object, sqlstate: str) -> PgError:
    assert isinstance(exc, PgError), repr(exc)
    assert exc.sqlstate == sqlstate, repr(exc)
    assert exc.severity == "FATAL"
    return exc


def client_key_of(password: str, salt: bytes, iterations: int) -> bytes:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.digest(salted, b"Client Key", "sha256")


# --- both sides against each other ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "md5", "scram"])
@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
async def test_right_password_logs_in(method: str, kind: str) -> None:
    server_res, client_res, _ = await login(method, SECRETS[kind], PASSWORD)
    if method == "scram-sha-256" and kind == "md5":
        # Postgres cannot run SCRAM from an md5 hash either; the exchange is doomed.
        assert_pg_error(server_res, "28P01")
        assert_pg_error(client_res, "28P01")
        return
    assert client_res is None
    assert isinstance(server_res, ClientAuthResult)
    # md5 with a SCRAM verifier runs SCRAM, as Postgres' CheckPWChallengeAuth does.
    expected = "scram-sha-256" if method == "scram-sha-256" or kind == "scram" else "md5"
    assert server_res.method == expected
    assert (server_res.scram_client_key is not None) == (expected == "scram-sha-256")


@pytest.mark.parametrize("kind", ["plain", "md5", "scram"])
@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
async def test_wrong_password_fails_with_28P01(method: str, kind: str) -> None:
    server_res, client_res, _ = await login(method, SECRETS[kind], WRONG)
    err = assert_pg_error(server_res, "28P01")
    assert err.message == f'password authentication failed for user "{USER}"'
    assert_pg_error(client_res, "28P01")


@pytest.mark.parametrize("secret", [None, "", "   ", "SCRAM-SHA-256$garbage"])
@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
async def test_unknown_user_runs_the_exchange_then_fails_with_28P01(
    method: str, secret: str | None
) -> None:
    """Under md5 too, an unknown user (or an empty or malformed secret) gets the doomed SCRAM
    exchange a SCRAM-verifier user would get, as Postgres does with the default
    password_encryption: an md5 challenge would tell a prober the user does not exist."""
    server_res, client_res, server_chan = await login(method, secret, PASSWORD)
    assert_pg_error(server_res, "28P01")
    assert_pg_error(client_res, "28P01")
    # The client got as far as with a wrong password: SASL, then SASLContinue.
    challenges = [m.parse_authentication(b) for t, b in server_chan.sent if t == m.AUTHENTICATION]
    assert [code for code, _ in challenges] == [m.AUTH_SASL, m.AUTH_SASL_CONTINUE]


async def test_md5_unknown_user_looks_like_a_scram_verifier_user() -> None:
    """The first answer under md5 is the same for an unknown user and a verifier user."""

    async def first_challenge(secret: str | None) -> tuple[int, bytes]:
        _, _, chan = await login("md5", secret, WRONG)
        return m.parse_authentication(chan.sent[0][1])

    assert await first_challenge(None) == await first_challenge(SCRAM_SECRET)
    assert (await first_challenge(MD5_SECRET))[0] == m.AUTH_MD5  # a real md5 hash: md5


async def test_unknown_user_gets_a_stable_salt() -> None:
    """A salt that changed on every attempt would tell a prober the user does not exist."""

    async def salt_for(user: str) -> bytes:
        _, _, chan = await login("scram-sha-256", None, PASSWORD, user=user)
        _, data = m.parse_authentication(chan.sent[1][1])
        return data.split(b",")[1]

    assert await salt_for("nobody") == await salt_for("nobody")
    assert await salt_for("nobody") != await salt_for("somebody")


async def test_failure_reason_is_logged_without_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await login("md5", MD5_SECRET, WRONG)
    await login("scram-sha-256", None, PASSWORD)
    text = caplog.text
    assert "Password does not match" in text and "does not exist" in text
    for secret in (PASSWORD, WRONG, MD5_SECRET[3:]):
        assert secret not in text


async def test_trust_exchanges_nothing() -> None:
    server_res, client_res, chan = await login("trust", None, None)
    assert server_res == ClientAuthResult("trust", None)
    assert client_res is None
    assert [t for t, _ in chan.sent] == [m.AUTHENTICATION]  # only AuthenticationOk


async def test_plain_password_verifier_is_derived_once_per_user() -> None:
    async def salt_for(user: str) -> bytes:
        _, client_res, chan = await login("scram-sha-256", PASSWORD, PASSWORD, user=user)
        assert client_res is None
        return m.parse_authentication(chan.sent[1][1])[1].split(b",")[1]

    assert await salt_for("bob") == await salt_for("bob")
    assert await salt_for("bob") != await salt_for("carol")  # same password, no shared salt


@pytest.mark.parametrize("password", ["pässwörd", "tab\there", "x\u00adx"])
async def test_saslprep_and_its_raw_fallback_agree_on_both_sides(password: str) -> None:
    """\\u00ad is mapped away by SASLprep; a tab is prohibited, so the raw bytes are used."""
    _, client_res, _ = await login("scram-sha-256", password, password)
    assert client_res is None


# --- stored verifiers and the recovered ClientKey ------------------------------------------------


def test_postgres_format_verifier_round_trips() -> None:
    v = scram.ScramVerifier.parse(SCRAM_SECRET)
    assert v == scram.ScramVerifier(4096, SALT, _STORED, _SERVER)
    assert str(v) == SCRAM_SECRET
    assert scram.ScramVerifier.from_password(PASSWORD, SALT) == v  # same derivation as scramp


@pytest.mark.parametrize(
    "text",
    [
        "",
        PASSWORD,
        "SCRAM-SHA-256$0:c2FsdA==$" + SCRAM_SECRET.split("$", 2)[2],
        "SCRAM-SHA-256$4096:!!$" + SCRAM_SECRET.split("$", 2)[2],
        SCRAM_SECRET[:-4],
        SCRAM_SECRET.replace("$4096:", "$x:"),
    ],
)
def test_malformed_verifiers_are_rejected(text: str) -> None:
    assert scram.ScramVerifier.parse(text) is None


async def test_scram_verifier_is_accepted_and_client_key_recovered() -> None:
    server_res, client_res, _ = await login("scram-sha-256", SCRAM_SECRET, PASSWORD)
    assert client_res is None
    assert isinstance(server_res, ClientAuthResult)
    assert server_res.scram_client_key == client_key_of(PASSWORD, SALT, 4096)
    assert hashlib.sha256(server_res.scram_client_key).digest() == _STORED


async def test_low_iteration_verifier_works_unlike_in_scramp() -> None:
    """Postgres 16's scram_iterations may be below 4096; scramp would refuse both ends."""
    verifier = scram.ScramVerifier.from_password(PASSWORD, SALT, iterations=10)
    server_res, client_res, _ = await login("scram-sha-256", str(verifier), PASSWORD)
    assert client_res is None
    assert isinstance(server_res, ClientAuthResult)
    assert server_res.scram_client_key == client_key_of(PASSWORD, SALT, 10)


def test_scramp_client_against_our_server() -> None:
    """An independent client (which, unlike libpq, sends the user name) is accepted."""
    client = scramp.ScramClient([scram.MECHANISM], USER, PASSWORD)
    server = scram_server.ScramServer(scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail())
    first = server.handle_client_first(client.get_client_first().encode())
    client.set_server_first(first.decode())
    final = server.handle_client_final(client.get_client_final().encode())
    assert final is not None
    client.set_server_final(final.decode())  # raises if our signature is wrong
    assert server.client_key == client_key_of(PASSWORD, SALT, 4096)


# RFC 7677, section 3 (user "user", password "pencil").
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")


def test_rfc7677_vector_client() -> None:
    client = scram_client.ScramClient("pencil", username="user", nonce=b"rOprNGfwEbeRWgbNEkqO")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.handle_server_final(RFC_SERVER_FINAL)
    assert client.finished


def test_rfc7677_vector_server() -> None:
    verifier = scram.ScramVerifier.from_password("pencil", RFC_SALT)
    server = scram_server.ScramServer(verifier, nonce=b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_client_sends_an_empty_user_name_like_libpq() -> None:
    assert scram_client.ScramClient(PASSWORD).client_first().startswith(b"n,,n=,r=")


# --- clients that misbehave ----------------------------------------------------------------------


async def drive_client(
    method: str, *messages: bytes, secret: str | None = SCRAM_SECRET
) -> BaseException | ClientAuthResult:
    """Run authenticate_client against a scripted client that sends ``messages`` in order."""
    server_chan, client_chan = channel_pair()
    for msg in messages:
        client_chan.write(msg)
    client_chan.close()
    try:
        return await timed(authenticate_client(server_chan, method, USER, secret))
    except (PgError, ConnectionError) as e:
        return e


def client_first(nonce: bytes = b"abc") -> bytes:
    return m.sasl_initial_response(scram.MECHANISM, b"n,,n=,r=" + nonce)


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
async def test_wrong_message_type_is_a_protocol_violation(method: str) -> None:
    err = assert_pg_error(await drive_client(method, m.query("select 1")), "08P01")
    assert f"got message type {m.QUERY}" in err.message


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
async def test_oversized_response_is_a_protocol_violation(method: str) -> None:
    big = m.password_message(b"x" * framing.AUTH_MESSAGE_LIMIT)
    assert_pg_error(await drive_client(method, big), "08P01")


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
async def test_disconnect_or_terminate_is_a_connection_error(method: str) -> None:
    assert isinstance(await drive_client(method), ConnectionError)
    assert isinstance(await drive_client(method, m.TERMINATE_MESSAGE), ConnectionError)


async def test_md5_password_without_terminator_is_a_protocol_violation() -> None:
    assert_pg_error(await drive_client("md5", m.password_message(b"md5abc")), "08P01")


@pytest.mark.parametrize(
    ("first", "sqlstate"),
    [
        (m.message(m.PASSWORD, b"SCRAM-SHA-256\0\0\0"), "08P01"),  # truncated length
        (m.message(m.PASSWORD, b"SCRAM-SHA-256"), "08P01"),  # no terminator
        (m.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=a"), "08P01"),
        (m.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=a"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b""), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"garbage"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"p=tls-unique,,n=,r=a"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,,r=abc"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,,n=,r="), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,,n=,r=a\x01b"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,,n=,r=a,junk"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,,n=,r=a\0"), "08P01"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,a=bob,n=,r=a"), "0A000"),
        (m.sasl_initial_response(scram.MECHANISM, b"n,,m=ext,n=,r=a"), "0A000"),
    ],
)
async def test_malformed_client_first_is_rejected(first: bytes, sqlstate: str) -> None:
    assert_pg_error(await drive_client("scram-sha-256", first), sqlstate)


@pytest.mark.parametrize(
    "final",
    [
        b"",
        b"garbage",
        b"c=biws",
        b"c=biws,r=abc",
        b"c=eSws,r=abc,p=" + base64.b64encode(bytes(32)),  # "y,," but the client said "n"
        b"c=!!!!,r=abc,p=" + base64.b64encode(bytes(32)),
        b"c=biws,r=abc,p=" + base64.b64encode(bytes(31)),
        b"c=biws,r=abc,p=not-base64",
        b"c=biws,r=abc,,p=" + base64.b64encode(bytes(32)),
        b"r=abc,c=biws,p=" + base64.b64encode(bytes(32)),
    ],
)
async def test_malformed_client_final_is_a_protocol_violation(final: bytes) -> None:
    err = await drive_client("scram-sha-256", client_first(), m.password_message(final))
    assert_pg_error(err, "08P01")


async def test_a_nonce_that_is_not_ours_is_a_protocol_violation() -> None:
    """As in Postgres: a client-final-message from another exchange (a replay) is refused
    before its proof is even looked at."""
    proof = b",p=" + base64.b64encode(bytes(32))
    err = await drive_client(
        "scram-sha-256", client_first(), m.password_message(b"c=biws,r=x" + proof)
    )
    assert assert_pg_error(err, "08P01").message == "invalid SCRAM response"


def test_wrong_proof_is_an_authentication_failure() -> None:
    server = scram_server.ScramServer(scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail())
    nonce = server.handle_client_first(b"n,,n=,r=abc").split(b",")[0][2:]
    assert (
        server.handle_client_final(b"c=biws,r=" + nonce + b",p=" + base64.b64encode(bytes(32)))
        is None
    )


def test_doomed_exchange_fails_even_with_the_right_password() -> None:
    verifier = scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail()
    server = scram_server.ScramServer(verifier, doomed=True)
    client = scram_client.ScramClient(PASSWORD)
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    assert server.handle_client_final(final) is None


def test_valid_proof_with_a_wrong_nonce_fails() -> None:
    """The proof is right for the message as sent (a replay), but the nonce is not ours."""
    server = scram_server.ScramServer(scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail())
    server_first = server.handle_client_first(b"n,,n=,r=abc")
    without_proof = b"c=biws,r=abcWRONG"
    auth_message = b"n=,r=abc," + server_first + b"," + without_proof
    key = client_key_of(PASSWORD, SALT, 4096)
    signature = hmac.digest(hashlib.sha256(key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(key, signature, strict=True))
    final = without_proof + b",p=" + base64.b64encode(proof)
    with pytest.raises(PgError, match="invalid SCRAM response") as info:
        server.handle_client_final(final)
    assert info.value.sqlstate == "08P01"
    assert server.client_key is None


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=80), final=st.binary(max_size=120))
def test_arbitrary_scram_bytes_never_crash_the_server(first: bytes, final: bytes) -> None:
    server = scram_server.ScramServer(scram.ScramVerifier.mock(USER))
    try:
        server.handle_client_first(first)
        assert server.handle_client_final(final) is None
    except PgError as e:
        assert e.sqlstate in ("08P01", "0A000")


@settings(max_examples=200, deadline=None)
@given(nonce=st.binary(min_size=1, max_size=30).filter(lambda b: b"," not in b and b"\0" not in b))
def test_server_accepts_any_printable_client_nonce(nonce: bytes) -> None:
    server = scram_server.ScramServer(scram.ScramVerifier.mock(USER))
    try:
        first = server.handle_client_first(b"n,,n=," + b"r=" + nonce)
    except PgError:
        assert any(not 0x21 <= c <= 0x7E for c in nonce)
    else:
        assert first.startswith(b"r=" + nonce)


# --- upstream servers that misbehave -------------------------------------------------------------


async def drive_upstream(
    *replies: bytes, password: str | None = PASSWORD
) -> tuple[BaseException | None, list[tuple[int, bytes]]]:
    """Run authenticate_upstream against a server that sends ``replies`` whatever we say."""
    server_chan, client_chan = channel_pair()
    for reply in replies:
        server_chan.write(reply)
    server_chan.close()
    try:
        await timed(authenticate_upstream(client_chan, USER, password))
    except (PgError, ConnectionError) as e:
        return e, client_chan.sent
    return None, client_chan.sent


async def test_cleartext_password() -> None:
    err, sent = await drive_upstream(m.authentication_cleartext(), m.authentication_ok())
    assert err is None
    assert sent == [(m.PASSWORD, PASSWORD.encode() + b"\0")]


async def test_md5_response_matches_the_postgres_formula() -> None:
    salt = b"\x01\x02\x03\x04"
    err, sent = await drive_upstream(m.authentication_md5(salt), m.authentication_ok())
    assert err is None
    inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert sent == [(m.PASSWORD, expected.encode() + b"\0")]


async def test_notices_during_authentication_are_skipped() -> None:
    notice = m.error_response({"S": "NOTICE", "C": "00000", "M": "hi"}, notice=True)
    err, _ = await drive_upstream(notice, m.authentication_ok())
    assert err is None


@pytest.mark.parametrize(
    "request_",
    [
        m.authentication_cleartext(),
        m.authentication_md5(b"salt"),
        m.authentication_sasl(["SCRAM-SHA-256"]),
    ],
)
async def test_missing_password_fails_before_sending_anything(request_: bytes) -> None:
    err, sent = await drive_upstream(request_, password=None)
    exc = assert_pg_error(err, "08001")
    assert exc.message == f'upstream requires a password for user "{USER}"'
    assert sent == []


async def test_trust_upstream_needs_no_password() -> None:
    err, _ = await drive_upstream(m.authentication_ok(), password=None)
    assert err is None


@pytest.mark.parametrize("sqlstate", ["28P01", "3D000", "53300"])
async def test_server_error_keeps_its_sqlstate(sqlstate: str) -> None:
    error = m.error_response({"S": "FATAL", "V": "FATAL", "C": sqlstate, "M": "nope"})
    err, _ = await drive_upstream(m.authentication_md5(b"salt"), error)
    assert isinstance(err, PgError)
    assert (err.sqlstate, err.message, err.severity) == (sqlstate, "nope", "FATAL")


@pytest.mark.parametrize(("code", "name"), [(7, "GSSAPI"), (9, "SSPI"), (2, "Kerberos"), (42, "")])
async def test_unsupported_methods_are_named(code: int, name: str) -> None:
    err, _ = await drive_upstream(m.authentication(code))
    exc = assert_pg_error(err, "08P01")
    assert name in exc.message and f"code {code}" in exc.message


@pytest.mark.parametrize(
    "replies",
    [
        (m.query("select 1"),),  # not an Authentication message
        (m.message(m.AUTHENTICATION, b"\0\0"),),  # too short for a code
        (m.authentication_md5(b"sal"),),  # salt is not 4 bytes
        (m.authentication(m.AUTH_SASL_CONTINUE, b"r=x,s=eA==,i=1"),),  # SASL never started
        (m.authentication_sasl(["SCRAM-SHA-256-PLUS"]),),  # nothing we can do without TLS
        (m.authentication_md5(b"salt"), m.authentication_cleartext()),  # second request
        (m.authentication_sasl(["SCRAM-SHA-256"]), m.authentication_ok()),  # skipped SASL
        (m.authentication_sasl(["SCRAM-SHA-256"]), m.authentication(m.AUTH_SASL_CONTINUE, b"")),
        (m.authentication_sasl(["SCRAM-SHA-256"]), m.authentication(m.AUTH_SASL_FINAL, b"v=x")),
    ],
)
async def test_unexpected_upstream_messages_are_protocol_violations(
    replies: tuple[bytes, ...],
) -> None:
    err, _ = await drive_upstream(*replies)
    assert_pg_error(err, "08P01")


async def test_connection_closed_by_upstream() -> None:
    err, _ = await drive_upstream(m.authentication_md5(b"salt"))
    assert isinstance(err, ConnectionError)


class FakeScramServer:
    """Answers authenticate_upstream's SCRAM messages, with hooks to tamper with them."""

    def __init__(self, server_first: bytes | None = None, server_final: bytes | None = None):
        self.server_first = server_first
        self.server_final = server_final

    async def run(self, chan: QueueChannel) -> None:
        server = scram_server.ScramServer(scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail())
        chan.write(m.authentication_sasl([scram.MECHANISM]))
        _, body = await chan.read_message(framing.AUTH_MESSAGE_LIMIT)
        first = server.handle_client_first(m.parse_sasl_initial_response(body)[1])
        chan.write(m.authentication(m.AUTH_SASL_CONTINUE, self.server_first or first))
        _, body = await chan.read_message(framing.AUTH_MESSAGE_LIMIT)
        final = server.handle_client_final(body)
        assert final is not None
        chan.write(m.authentication(m.AUTH_SASL_FINAL, self.server_final or final))
        chan.write(m.authentication_ok())


async def run_fake(fake: FakeScramServer) -> BaseException | None:
    server_chan, client_chan = channel_pair()
    task = asyncio.create_task(fake.run(server_chan))
    try:
        await timed(authenticate_upstream(client_chan, USER, PASSWORD))
    except PgError as e:
        return e
    finally:
        task.cancel()
    return None


async def test_fake_scram_server_baseline() -> None:
    assert await run_fake(FakeScramServer()) is None


@pytest.mark.parametrize(
    "server_final",
    [
        b"v=" + base64.b64encode(bytes(32)),  # a server that does not know the verifier
        b"e=invalid-proof",
        b"v=***",
        b"x=1",
    ],
)
async def test_bad_server_final_is_rejected(server_final: bytes) -> None:
    assert_pg_error(await run_fake(FakeScramServer(server_final=server_final)), "08P01")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someone-elses-nonce,s=c2FsdA==,i=4096",
        b"r=,s=c2FsdA==,i=4096",
        b"e=other-error",
        b"garbage",
    ],
)
async def test_bad_server_first_is_rejected(server_first: bytes) -> None:
    assert_pg_error(await run_fake(FakeScramServer(server_first=server_first)), "08P01")


@pytest.mark.parametrize(
    "server_first",
    [
        b"s=c2FsdA==,i=4096",  # no nonce
        b"r=Nx,s=,i=4096",  # empty salt
        b"r=Nx,s=c2FsdA==,i=0",
        b"r=Nx,s=c2FsdA==,i=-1",
        b"r=Nx,s=c2FsdA==,i=4096,?",  # garbage after the attributes
        b"r=N,s=c2FsdA==,i=1",  # the server added nothing to our nonce
        b"r=N\x01,s=c2FsdA==,i=1",
        b"r=Nx,s=c2FsdA==,i=1\0",
        b"r=Nx,s=c2FsdA==,i=" + b"9" * 5000,  # int() of it would raise ValueError
        b"r=Nx,s=c2FsdA==,i=2147483648",
    ],
)
def test_malformed_server_first_is_rejected(server_first: bytes) -> None:
    client = scram_client.ScramClient(PASSWORD, nonce=b"N")
    client.client_first()
    with pytest.raises(PgError) as info:
        client.handle_server_first(server_first)
    assert info.value.sqlstate == "08P01"


def test_an_upstream_iteration_count_above_the_cap_is_refused_before_any_pbkdf2() -> None:
    """A server announcing a huge count would pin a thread in PBKDF2 for minutes per login."""
    client = scram_client.ScramClient(PASSWORD, nonce=b"N")
    client.client_first()
    with pytest.raises(PgError) as info:
        client.handle_server_first(
            b"r=Nx,s=c2FsdA==,i=" + str(scram_client.MAX_ITERATIONS + 1).encode()
        )
    assert info.value.sqlstate == "08P01"
    assert "above pgproxy's limit" in str(info.value.detail)
    ok = scram_client.ScramClient(PASSWORD, nonce=b"N")
    ok.client_first()
    _salt, iterations = ok.read_server_first(b"r=Nx,s=c2FsdA==,i=4096")
    assert iterations == 4096


def test_a_stored_verifier_with_a_huge_iteration_count_is_malformed() -> None:
    rest = SCRAM_SECRET.split("$", 2)[2]
    assert scram.ScramVerifier.parse(f"SCRAM-SHA-256${'9' * 5000}:c2FsdA==${rest}") is None
    assert scram.ScramVerifier.parse(f"SCRAM-SHA-256$2147483648:c2FsdA==${rest}") is None
    assert scram.ScramVerifier.parse(f"SCRAM-SHA-256$2147483647:c2FsdA==${rest}") is not None
    from pgproxy.config import ConfigError, parse_config

    for count in ("9" * 5000, "2147483648"):
        with pytest.raises(ConfigError, match="malformed SCRAM-SHA-256 verifier"):
            parse_config({"users": {"u": {"password": f"SCRAM-SHA-256${count}:c2FsdA==${rest}"}}})


# --- pass-through: logging in upstream with a verifier and a recovered ClientKey -----------------


async def recovered_key(secret: str = SCRAM_SECRET) -> bytes:
    server_res, _, _ = await login("scram-sha-256", secret, PASSWORD)
    assert isinstance(server_res, ClientAuthResult) and server_res.scram_client_key is not None
    return server_res.scram_client_key


async def upstream_login(
    server_secret: str, credential: object, method: str = "scram-sha-256"
) -> object:
    """The proxy (as a Postgres) holding ``server_secret``; the upstream side logs in with
    ``credential`` (a pass-through object). Returns the upstream side's error or None."""
    server_chan, client_chan = channel_pair()

    async def serve() -> None:
        try:
            await authenticate_client(server_chan, method, USER, server_secret)
        except PgError as e:
            server_chan.write(m.error_response(e.fields()))
            raise
        server_chan.write(m.authentication_ok())

    async def connect() -> None:
        try:
            await authenticate_upstream(client_chan, USER, credential)  # type: ignore[arg-type]
        except BaseException:
            client_chan.close()
            raise

    _, client_res = await timed(asyncio.gather(serve(), connect(), return_exceptions=True))
    return client_res


async def test_scram_pass_through_signs_with_the_recovered_key() -> None:
    verifier = scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail()
    keys = scram.ScramPassThrough(verifier, await recovered_key())
    assert await upstream_login(SCRAM_SECRET, keys) is None
    assert "keys=***" in repr(keys) and base64.b64encode(keys.client_key).decode() not in repr(keys)


async def test_scram_pass_through_with_another_verifier_fails_clearly() -> None:
    verifier = scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail()
    keys = scram.ScramPassThrough(verifier, await recovered_key())
    other = str(scram.ScramVerifier.from_password(PASSWORD, b"another-salt-16b"))
    err = assert_pg_error(await upstream_login(other, keys), "28000")
    assert err.message.startswith(f'SCRAM pass-through failed for user "{USER}"')


async def test_md5_pass_through_answers_md5_from_the_hash() -> None:
    from pgproxy.auth.credentials import Md5PassThrough

    assert await upstream_login(MD5_SECRET, Md5PassThrough(MD5_SECRET), "md5") is None
    wrong = "md5" + hashlib.md5(b"x").hexdigest()
    assert_pg_error(await upstream_login(MD5_SECRET, Md5PassThrough(wrong), "md5"), "28P01")


async def test_a_verifier_of_the_wrong_kind_is_refused_before_sending_anything() -> None:
    from pgproxy.auth.credentials import Md5PassThrough

    verifier = scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail()
    keys = scram.ScramPassThrough(verifier, bytes(32))
    for request, credential in [
        (m.authentication_md5(b"salt"), keys),
        (m.authentication_cleartext(), keys),
        (m.authentication_sasl([scram.MECHANISM]), Md5PassThrough(MD5_SECRET)),
    ]:
        server_chan, client_chan = channel_pair()
        server_chan.write(request)
        with pytest.raises(PgError) as info:
            await timed(authenticate_upstream(client_chan, USER, credential))
        assert info.value.sqlstate == "08001"
        assert client_chan.sent == []


def test_pass_through_store_learns_only_usable_credentials() -> None:
    from pgproxy.auth.credentials import Md5PassThrough, PassThroughStore

    a, b, c, d = (("db", 5432, user) for user in "abcd")
    store = PassThroughStore(size=2)
    store.learn(a, PASSWORD, None)  # a plain password (from auth_query) is used as it is
    store.learn(b, SCRAM_SECRET, None)  # a verifier without a ClientKey: nothing to use
    assert store.get(a) == PASSWORD and store.get(b) is None
    store.learn(b, SCRAM_SECRET, b"k" * 32)
    store.learn(c, MD5_SECRET, None)
    assert isinstance(store.get(b), scram.ScramPassThrough)
    assert store.get(c) == Md5PassThrough(MD5_SECRET)
    store.learn(d, MD5_SECRET, None)
    assert store.get(b) is None and len(store) == 2  # bounded, least recently learnt goes
    store.clear()
    assert len(store) == 0


def test_pass_through_store_keeps_clusters_apart() -> None:
    """The same role on two clusters (or ports) has two entries: neither overwrites the other."""
    from pgproxy.auth.credentials import Md5PassThrough, PassThroughStore

    store = PassThroughStore()
    store.learn(("one", 5432, USER), MD5_SECRET, None)
    store.learn(("two", 5432, USER), PASSWORD, None)
    store.learn(("one", 5433, USER), SCRAM_SECRET, b"k" * 32)
    assert store.get(("one", 5432, USER)) == Md5PassThrough(MD5_SECRET)
    assert store.get(("two", 5432, USER)) == PASSWORD
    assert isinstance(store.get(("one", 5433, USER)), scram.ScramPassThrough)
    assert store.get(("three", 5432, USER)) is None


# --- SCRAM-SHA-256-PLUS --------------------------------------------------------------------------

CBIND = hashlib.sha256(b"the proxy's certificate").digest()


async def test_plus_is_offered_first_and_works_with_scramp() -> None:
    server_chan, client_chan = channel_pair()
    task = asyncio.create_task(
        authenticate_client(server_chan, "scram-sha-256", USER, SCRAM_SECRET, channel_binding=CBIND)
    )
    _, body = await timed(client_chan.read_message(framing.AUTH_MESSAGE_LIMIT))
    _, data = m.parse_authentication(body)
    assert m.parse_sasl_mechanisms(data) == [scram.MECHANISM_PLUS, scram.MECHANISM]
    client = scramp.ScramClient(
        [scram.MECHANISM_PLUS], USER, PASSWORD, channel_binding=("tls-server-end-point", CBIND)
    )
    client_chan.write(
        m.sasl_initial_response(scram.MECHANISM_PLUS, client.get_client_first().encode())
    )
    _, body = await timed(client_chan.read_message(framing.AUTH_MESSAGE_LIMIT))
    client.set_server_first(m.parse_authentication(body)[1].decode())
    client_chan.write(m.password_message(client.get_client_final().encode()))
    _, body = await timed(client_chan.read_message(framing.AUTH_MESSAGE_LIMIT))
    client.set_server_final(m.parse_authentication(body)[1].decode())
    result = await timed(task)
    assert result.scram_client_key == client_key_of(PASSWORD, SALT, 4096)


def plus_server() -> scram_server.ScramServer:
    return scram_server.ScramServer(
        scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail(), channel_binding=CBIND
    )


@pytest.mark.parametrize(
    ("first", "plus", "message"),
    [
        (b"y,,n=,r=abc", False, "SCRAM channel binding negotiation error"),  # downgrade
        (b"n,,n=,r=abc", True, "SCRAM-PLUS, but the SCRAM message does not include"),
        (b"p=tls-unique,,n=,r=abc", True, 'unsupported SCRAM channel-binding type "tls-unique"'),
        (b"p=tls-server-end-point", True, "Comma expected"),
        (b"p=tls-server-end-point,,", True, 'Expected attribute "n"'),
    ],
)
def test_bad_channel_binding_negotiation_is_08P01(first: bytes, plus: bool, message: str) -> None:
    with pytest.raises(PgError) as info:
        plus_server().handle_client_first(first, plus=plus)
    assert info.value.sqlstate == "08P01"
    text = f"{info.value.message} {info.value.detail}".replace("SCRAM-SHA-256-PLUS", "SCRAM-PLUS")
    assert message in text


@pytest.mark.parametrize(
    ("cbind", "message"),
    [
        (b"p=tls-server-end-point,," + bytes(32), "SCRAM channel binding check failed"),
        (b"n,,", "unexpected SCRAM channel-binding attribute"),
    ],
)
def test_wrong_channel_binding_data_is_refused(cbind: bytes, message: str) -> None:
    server = plus_server()
    server.handle_client_first(b"p=tls-server-end-point,,n=,r=abc", plus=True)
    final = b"c=" + base64.b64encode(cbind) + b",r=abc,p=" + base64.b64encode(bytes(32))
    with pytest.raises(PgError, match=message) as info:
        server.handle_client_final(final)
    assert info.value.sqlstate == "08P01"


def test_y_flag_is_fine_when_plus_is_not_offered() -> None:
    server = scram_server.ScramServer(scram.ScramVerifier.parse(SCRAM_SECRET) or pytest.fail())
    assert server.handle_client_first(b"y,,n=,r=abc").startswith(b"r=abc")


# --- failures cost what successes cost -----------------------------------------------------------


async def test_every_failure_does_the_same_verification_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unknown user, wrong password, a secret SCRAM cannot use (an md5 hash): each runs the
    whole exchange, checks the proof with the same StoredKey hash as a right one, and none
    runs PBKDF2 (the verifier is stored; the mock one needs none), so none answers sooner."""
    hashes = 0
    real_sha256 = hashlib.sha256

    def counting_sha256(data: bytes = b"") -> Any:
        nonlocal hashes
        hashes += 1
        return real_sha256(data)

    await login("scram-sha-256", SCRAM_SECRET, WRONG)  # warm the client side's key cache
    await login("scram-sha-256", SCRAM_SECRET, PASSWORD)

    async def work(secret: str | None, password: str) -> tuple[int, int, int]:
        nonlocal hashes
        hashes = 0
        before = scram.derivations
        monkeypatch.setattr(scram.hashlib, "sha256", counting_sha256)
        try:
            _, _, chan = await login("scram-sha-256", secret, password)
        finally:
            monkeypatch.undo()
        challenges = sum(1 for t, _ in chan.sent if t == m.AUTHENTICATION)
        return hashes, scram.derivations - before, challenges

    wrong = await work(SCRAM_SECRET, WRONG)
    unknown = await work(None, WRONG)
    md5_hash = await work(MD5_SECRET, WRONG)
    right = await work(SCRAM_SECRET, PASSWORD)
    assert wrong == unknown == md5_hash == (1, 0, 2)  # one proof check, no PBKDF2, 2 challenges
    assert right == (1, 0, 4)  # the same, then SASLFinal and AuthenticationOk


async def test_plain_password_pbkdf2_runs_once_off_the_event_loop() -> None:
    import threading

    threads: list[str] = []
    real = scram._derive

    def spy(password: str, salt: bytes, iterations: int) -> scram.ScramKeys:
        threads.append(threading.current_thread().name)
        return real(password, salt, iterations)

    scram._derive = spy  # type: ignore[assignment]
    try:
        for _ in range(3):
            _, client_res, _ = await login("scram-sha-256", "a fresh one", "a fresh one")
            assert client_res is None
    finally:
        scram._derive = real  # type: ignore[assignment]
    # Once for the proxy's own verifier of the plain password; the client side of the test
    # then hits the same (password, salt) cache entry.
    assert len(threads) == 1
    assert threads[0] != threading.main_thread().name


async def test_a_storm_of_cold_logins_derives_once() -> None:
    """Logins that arrive while the first PBKDF2 of a key is running wait for it instead of
    each starting their own (a restart under load used to derive once per login)."""
    derived: list[int] = []
    real = scram._derive

    def spy(password: str, salt: bytes, iterations: int) -> scram.ScramKeys:
        derived.append(1)
        return real(password, salt, iterations)

    scram._derive = spy  # type: ignore[assignment]
    try:
        salt = b"storm-salt-0001"
        results = await asyncio.gather(
            *(scram.salted_keys_off_loop("storm password", salt, 4096) for _ in range(50))
        )
    finally:
        scram._derive = real  # type: ignore[assignment]
    assert derived == [1]
    assert all(r == results[0] for r in results)
