"""Clients authenticating to the proxy: the proxy plays the Postgres server.

Theory of operation: :func:`authenticate_client` runs one exchange over a
:class:`~pgproxy.auth.channel.MessageChannel` and either returns (the caller then sends
AuthenticationOk) or raises a FATAL :class:`PgError` for the caller to send. Which exchange runs
follows Postgres' ``CheckPWChallengeAuth``:

=============  ==============  ==============  ===================  =====================
method         plain password  md5 hash        SCRAM verifier       unknown user
=============  ==============  ==============  ===================  =====================
md5            md5             md5             SCRAM (as Postgres)  SCRAM, always fails
scram-sha-256  SCRAM           SCRAM, fails    SCRAM                SCRAM, always fails
=============  ==============  ==============  ===================  =====================

An unknown user, an empty secret and a malformed SCRAM verifier all get the doomed SCRAM
exchange under md5 too, as Postgres with the default ``password_encryption`` does: answering
them with an md5 challenge while a verifier user gets SASL would tell a prober which users
exist. (A plain password under md5 gets md5, like an md5 hash.)

Doomed exchanges run to the end before failing with the same 28P01 as a wrong password, so a
client cannot tell an unknown user from a wrong password: a doomed SCRAM exchange verifies the
proof against a mock verifier with the same HMAC work as a real one, and neither does PBKDF2
(a stored verifier needs none; a plain password's verifier is derived once per process, in a
worker thread). Why it failed goes to the log only.

Over TLS with a known certificate hash, SCRAM-SHA-256-PLUS (``tls-server-end-point`` channel
binding) is offered first, as Postgres does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from pgproxy.auth import scram
from pgproxy.auth.channel import MessageChannel
from pgproxy.auth.credentials import is_md5_hash
from pgproxy.auth.scram_server import ScramServer
from pgproxy.protocol import framing
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import INVALID_PASSWORD, PROTOCOL_VIOLATION, PgError, fatal

_log = logging.getLogger(__name__)

TRUST = "trust"
MD5 = "md5"
SCRAM_SHA_256 = "scram-sha-256"


@dataclass(frozen=True)
class ClientAuthResult:
    """How the client proved itself.

    ``method`` is the exchange that actually ran (md5 with a SCRAM verifier runs SCRAM).
    ``scram_client_key`` is the ClientKey recovered from a SCRAM proof (ClientProof XOR
    ClientSignature): with it the proxy can later answer an upstream SCRAM challenge for the
    same verifier without knowing the password (pass-through).
    """

    method: str
    scram_client_key: bytes | None = None


async def authenticate_client(
    chan: MessageChannel,
    method: str,
    user: str,
    secret: str | None,
    *,
    channel_binding: bytes | None = None,
) -> ClientAuthResult:
    """Authenticate a client against ``secret`` (plain, ``md5...`` or a SCRAM verifier).

    ``secret`` is None for a user that is not configured. ``channel_binding`` is this TLS
    connection's ``tls-server-end-point`` data; given, SCRAM-SHA-256-PLUS is offered. Raises
    FATAL 28P01 on a wrong password or unknown user, FATAL 08P01 (or 0A000) on a malformed
    exchange, and lets ConnectionError through when the client goes away.
    """
    if method == TRUST:
        return ClientAuthResult(TRUST)
    if method not in (MD5, SCRAM_SHA_256):
        raise ValueError(f"unknown authentication method {method!r}")
    if secret is not None and not secret.strip():
        secret = None  # an empty password is no password: the same doomed exchange
    verifier = scram.parse_verifier(secret) if secret is not None else None
    if method == MD5 and secret is not None and verifier is None and not _looks_like_scram(secret):
        return await _md5_exchange(chan, user, secret)
    return await _scram_exchange(chan, user, secret, verifier, channel_binding)


def _looks_like_scram(secret: str | None) -> bool:
    return secret is not None and secret.startswith("SCRAM-SHA-256$")


def _failed(user: str, reason: str) -> PgError:
    _log.warning("password authentication failed for user %r: %s", user, reason)
    return fatal(INVALID_PASSWORD, f'password authentication failed for user "{user}"')


async def _read_response(chan: MessageChannel, what: str) -> bytes:
    try:
        type_, body = await chan.read_message(framing.AUTH_MESSAGE_LIMIT)
    except m.ProtocolError as e:
        raise fatal(PROTOCOL_VIOLATION, str(e)) from None
    if type_ == m.TERMINATE:  # a polite disconnect, e.g. a driver giving up on a password
        raise ConnectionError("client terminated during authentication")
    if type_ != m.PASSWORD:
        raise fatal(PROTOCOL_VIOLATION, f"expected {what} response, got message type {type_}")
    return body


def _md5_hex(data: bytes) -> bytes:
    return hashlib.md5(data).hexdigest().encode("ascii")


async def _md5_exchange(chan: MessageChannel, user: str, secret: str) -> ClientAuthResult:
    salt = secrets.token_bytes(4)
    chan.write(m.authentication_md5(salt))
    body = await _read_response(chan, "password")
    try:
        response = m.parse_password(body)
    except m.ProtocolError:
        raise fatal(PROTOCOL_VIOLATION, "invalid password packet size") from None

    if is_md5_hash(secret):
        inner, reason = secret[3:].encode("ascii"), f'Password does not match for user "{user}".'
    else:
        inner = _md5_hex((secret + user).encode("utf-8", "surrogateescape"))
        reason = f'Password does not match for user "{user}".'
    expected = b"md5" + _md5_hex(inner + salt)
    if not hmac.compare_digest(response, expected):
        raise _failed(user, reason)
    return ClientAuthResult(MD5)


_PLAIN_CACHE_SIZE = 1024
_plain_verifiers: OrderedDict[tuple[str, str], scram.ScramVerifier] = OrderedDict()
_plain_lock = threading.Lock()  # several event loops may share the process (tests)


async def _verifier_for_plain(user: str, password: str) -> scram.ScramVerifier:
    """One verifier (4096 iterations) per (user, password) per process.

    The salt is HMAC(mock key, user) (:func:`scram.mock_salt`): every worker of a multi-process
    pgproxy shares the key, so all announce the same salt for a user, as they do for an unknown
    one (a salt that changed from worker to worker would set these users apart). Per-user salts
    mean two users with the same password still get different ones. Caching keeps PBKDF2 off
    repeated logins, and the first derivation runs in a worker thread.
    """
    key = (user, password)
    with _plain_lock:
        verifier = _plain_verifiers.get(key)
    if verifier is None:
        salt = scram.mock_salt(user)
        keys = await scram.salted_keys_off_loop(password, salt, scram.DEFAULT_ITERATIONS)
        verifier = scram.ScramVerifier(
            scram.DEFAULT_ITERATIONS, salt, keys.stored_key, keys.server_key
        )
    with _plain_lock:
        verifier = _plain_verifiers.setdefault(key, verifier)  # a concurrent login may have won
        _plain_verifiers.move_to_end(key)
        while len(_plain_verifiers) > _PLAIN_CACHE_SIZE:
            _plain_verifiers.popitem(last=False)
    return verifier


async def _scram_exchange(
    chan: MessageChannel,
    user: str,
    secret: str | None,
    verifier: scram.ScramVerifier | None,
    channel_binding: bytes | None,
) -> ClientAuthResult:
    reason = f'Password does not match for user "{user}".'
    doomed = False
    if verifier is None:
        if secret is None:
            reason, doomed = f'Role "{user}" does not exist.', True
        elif is_md5_hash(secret):
            reason, doomed = f'User "{user}" does not have a valid SCRAM secret.', True
        elif _looks_like_scram(secret):
            reason, doomed = f'User "{user}" has a malformed SCRAM verifier.', True
        else:
            verifier = await _verifier_for_plain(user, secret)
    server = ScramServer(
        verifier or scram.ScramVerifier.mock(user), doomed=doomed, channel_binding=channel_binding
    )

    offered = [scram.MECHANISM]
    if channel_binding is not None:
        offered.insert(0, scram.MECHANISM_PLUS)
    chan.write(m.authentication_sasl(offered))
    body = await _read_response(chan, "SASL")
    try:
        mechanism, data = m.parse_sasl_initial_response(body)
    except m.ProtocolError:
        raise fatal(PROTOCOL_VIOLATION, "malformed SASLInitialResponse message") from None
    if mechanism not in offered:
        raise fatal(PROTOCOL_VIOLATION, "client selected an invalid SASL authentication mechanism")
    plus = mechanism == scram.MECHANISM_PLUS
    chan.write(m.authentication(m.AUTH_SASL_CONTINUE, server.handle_client_first(data, plus=plus)))

    data = await _read_response(chan, "SASL")  # SASLResponse: the body is the SCRAM message
    final = server.handle_client_final(data)
    if final is None:
        raise _failed(user, reason)
    chan.write(m.authentication(m.AUTH_SASL_FINAL, final))
    return ClientAuthResult(SCRAM_SHA_256, server.client_key)
