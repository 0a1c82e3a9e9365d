"""SCRAM-SHA-256 (RFC 5802, RFC 7677) the way Postgres speaks it, for both ends of the proxy.

Theory of operation: two small state machines with no I/O. :class:`ScramServer` checks a client
that logs in to the proxy; :class:`ScramClient` logs the proxy in to an upstream server. Bytes go
in, bytes come out; ``frontend.py`` and ``upstream.py`` move them over the wire. A malformed
message raises a FATAL :class:`PgError` (08P01, or 0A000 for features Postgres does not support
either); a wrong password is not an exception here: :meth:`ScramServer.handle_client_final`
returns None and the caller reports 28P01.

Why not scramp's ``ScramServer``/``ScramClient`` (scramp is still used for SASLprep, and the tests
use it as an independent implementation to check this one):

* libpq sends ``n,,n=,r=...``: an empty user name, because Postgres ignores it and uses the
  startup packet's. scramp's server rejects the empty attribute, and the name is part of the
  signed AuthMessage, so it cannot be rewritten on the way in.
* scramp insists on >= 4096 iterations and salts of >= 12 bytes. Postgres accepts any count >= 1
  (``scram_iterations``, PG 16) in stored verifiers and announces it to clients.
* The proxy needs the ClientKey that a client's proof reveals, for SCRAM pass-through to the
  upstream later; a pass-through client then signs with that key instead of a password.
* Channel binding (SCRAM-SHA-256-PLUS, ``tls-server-end-point``) needs the hash of the proxy's
  own certificate, which the caller computes (``cbind.py``) and hands to :class:`ScramServer`.

PBKDF2 (1.6 ms for 4096 iterations on the 2-core test machine) runs once per (password, salt,
iterations) per process: :func:`salted_keys` keeps a bounded LRU, and
:func:`salted_keys_off_loop` computes a miss in a worker thread so a login storm with fresh
passwords does not stall the event loop.

Messages are handled as bytes, never decoded: the AuthMessage must be exactly what was sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from scramp.utils import ScramException, saslprep  # type: ignore[import-untyped]

from pgproxy.protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    INVALID_AUTHORIZATION_SPECIFICATION,
    PROTOCOL_VIOLATION,
    PgError,
    fatal,
)

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CBIND_TYPE = b"tls-server-end-point"  # the only channel binding type Postgres supports
DEFAULT_ITERATIONS = 4096  # Postgres' default scram_iterations
SALT_LENGTH = 16  # SCRAM_DEFAULT_SALT_LEN
KEY_LENGTH = 32  # SHA-256 digest size
_RAW_NONCE_LENGTH = 18  # SCRAM_RAW_NONCE_LEN; base64 makes it 24 printable characters
_PREFIX = "SCRAM-SHA-256$"
_MALFORMED = "malformed SCRAM message"

# Upstream iteration counts above this are refused before any PBKDF2 runs: a hostile or
# misconfigured server announcing 2**31 - 1 would pin a worker thread for minutes per login.
MAX_ITERATIONS = 10_000_000
_MAX_ITERATION_DIGITS = 10  # enough for 2**31 - 1; checked before int() (no 4300-digit parse)

# The key for mock salts (and plain-password verifier salts), so an unknown user always gets
# the same salt (a changing salt would tell a prober the user does not exist), like Postgres'
# mock_auth_nonce. With several workers the supervisor generates one key and hands it to every
# worker in MOCK_KEY_ENV (hex), so all workers answer alike; a full restart picks a new key
# (Postgres keeps its nonce in pg_control across restarts).
MOCK_KEY_ENV = "PGPROXY_MOCK_AUTH_KEY"


def parse_mock_key(text: str) -> bytes | None:
    """The key in ``text`` (hex, at least 16 bytes), or None."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        return None
    return key if len(key) >= 16 else None


def new_mock_key() -> str:
    """A fresh random key, as :data:`MOCK_KEY_ENV` carries it."""
    return secrets.token_hex(32)


_MOCK_KEY = parse_mock_key(os.environ.get(MOCK_KEY_ENV, "")) or secrets.token_bytes(32)


def mock_salt(user: str) -> bytes:
    """A salt derived from the process' mock key and ``user``: stable, unpredictable."""
    return _hmac(_MOCK_KEY, user.encode("utf-8", "surrogateescape"))[:SALT_LENGTH]


def _iteration_count(text: bytes | str, maximum: int) -> int | None:
    """A decimal count in 1..maximum, or None (length checked before int())."""
    if not (0 < len(text) <= _MAX_ITERATION_DIGITS and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if 1 <= value <= maximum else None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _b64decode(data: bytes | str) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def normalize_password(password: str) -> bytes:
    """SASLprep the password; if SASLprep rejects it, use the raw UTF-8 bytes.

    That fallback is what Postgres (``pg_saslprep``) and libpq do, so a password with, say, a
    control character still works as long as both ends agree on it.
    """
    try:
        prepared: str = saslprep(password)
    except ScramException:
        prepared = password
    return prepared.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ScramKeys:
    """The keys one password and salt yield (a verifier holds only the last two)."""

    client_key: bytes
    stored_key: bytes
    server_key: bytes


_KEY_CACHE_SIZE = 1024
# (password, salt, iterations) -> keys, least recently used first. Worker threads only run the
# pure _derive; the lock is for several event loops in one process (tests run proxies in threads).
_key_cache: OrderedDict[tuple[str, bytes, int], ScramKeys] = OrderedDict()
_key_lock = threading.Lock()
derivations = 0  # PBKDF2 runs so far (for tests and the login-storm measurement)


def _derive(password: str, salt: bytes, iterations: int) -> ScramKeys:
    salted = hashlib.pbkdf2_hmac("sha256", normalize_password(password), salt, iterations)
    return keys_from_client_key(_hmac(salted, b"Client Key"), _hmac(salted, b"Server Key"))


def _cached(key: tuple[str, bytes, int]) -> ScramKeys | None:
    with _key_lock:
        keys = _key_cache.get(key)
        if keys is not None:
            _key_cache.move_to_end(key)
        return keys


def _remember(key: tuple[str, bytes, int], keys: ScramKeys) -> ScramKeys:
    global derivations
    with _key_lock:
        derivations += 1
        _key_cache[key] = keys
        while len(_key_cache) > _KEY_CACHE_SIZE:
            _key_cache.popitem(last=False)
    return keys


def salted_keys(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """Run PBKDF2 (the expensive part) once per (password, salt, iterations) per process."""
    key = (password, salt, iterations)
    return _cached(key) or _remember(key, _derive(password, salt, iterations))


_KeysKey = tuple[str, bytes, int]
# Derivations running in the thread pool, so that a storm of logins with the same cold key
# waits for one PBKDF2 instead of each starting its own (bench/RESULTS.md: 1,112 of 2,000).
_in_flight: dict[tuple[asyncio.AbstractEventLoop, _KeysKey], asyncio.Future[ScramKeys]] = {}


async def salted_keys_off_loop(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """:func:`salted_keys`, with a cache miss computed once in the default thread pool."""
    key = (password, salt, iterations)
    keys = _cached(key)
    if keys is not None:
        return keys
    loop = asyncio.get_running_loop()
    flight = (loop, key)
    pending = _in_flight.get(flight)
    if pending is None:
        pending = _in_flight[flight] = loop.run_in_executor(None, _derive, *key)
        pending.add_done_callback(lambda _: _in_flight.pop(flight, None))
    # Shielded: a login that gives up must not cancel the derivation others wait for.
    return _remember(key, await asyncio.shield(pending))


def keys_from_client_key(client_key: bytes, server_key: bytes) -> ScramKeys:
    """Keys without the password: what SCRAM pass-through has (a client's recovered ClientKey)."""
    return ScramKeys(client_key, hashlib.sha256(client_key).digest(), server_key)


@dataclass(frozen=True)
class ScramVerifier:
    """What a server stores: Postgres' ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> ScramVerifier | None:
        """The verifier in ``text``, or None if malformed (Postgres' ``parse_scram_secret``)."""
        if not text.startswith(_PREFIX):
            return None
        head, _, keys = text[len(_PREFIX) :].partition("$")
        iterations, _, salt_b64 = head.partition(":")
        stored_b64, _, server_b64 = keys.partition(":")
        count = _iteration_count(iterations, 2**31 - 1)  # Postgres' scram_iterations range
        if count is None:
            return None
        salt = _b64decode(salt_b64)
        stored = _b64decode(stored_b64)
        server = _b64decode(server_b64)
        if not salt or stored is None or server is None:
            return None
        if len(stored) != KEY_LENGTH or len(server) != KEY_LENGTH:
            return None
        return cls(count, salt, stored, server)

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """Derive a verifier as ``CREATE ROLE ... PASSWORD`` does (random 16-byte salt)."""
        salt = secrets.token_bytes(SALT_LENGTH) if salt is None else salt
        keys = salted_keys(password, salt, iterations)
        return cls(iterations, salt, keys.stored_key, keys.server_key)

    @classmethod
    def mock(cls, user: str) -> ScramVerifier:
        """A verifier nobody can match, with a stable per-user salt: for doomed exchanges."""
        return cls(
            DEFAULT_ITERATIONS, mock_salt(user), secrets.token_bytes(32), secrets.token_bytes(32)
        )

    def __str__(self) -> str:
        salt, stored, server = (
            _b64(x).decode() for x in (self.salt, self.stored_key, self.server_key)
        )
        return f"{_PREFIX}{self.iterations}:{salt}${stored}:{server}"


@dataclass(frozen=True, repr=False)
class ScramPassThrough:
    """What SCRAM pass-through logs in upstream with: a verifier and the ClientKey a client's
    proof revealed for it. Equivalent to the password for that verifier: never logged."""

    verifier: ScramVerifier
    client_key: bytes

    def __repr__(self) -> str:
        return f"ScramPassThrough(iterations={self.verifier.iterations}, keys=***)"


def _nonce() -> bytes:
    return _b64(secrets.token_bytes(_RAW_NONCE_LENGTH))


def _printable(value: bytes) -> bool:
    """RFC 5802 ``printable``: 0x21-0x7E except ','."""
    return all(0x21 <= c <= 0x7E and c != 0x2C for c in value)


def _is_attr(part: bytes) -> bool:
    """``attr-val``: one ASCII letter, '=', then anything (extension values may be empty)."""
    return len(part) >= 2 and chr(part[0]).isascii() and chr(part[0]).isalpha() and part[1] == 0x3D


def _expect(part: bytes, name: bytes, where: str) -> bytes:
    if not part.startswith(name + b"="):
        found = chr(part[0]) if part else "end of message"
        raise fatal(
            PROTOCOL_VIOLATION,
            _MALFORMED,
            detail=f'Expected attribute "{name.decode()}" but found "{found}" in {where}.',
        )
    return part[2:]


def _check_text(data: bytes) -> None:
    if not data:
        raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="The message is empty.")
    if b"\0" in data:
        raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="The message contains a NUL byte.")


class ScramServer:
    """The server side of one exchange (Postgres' ``auth-scram.c``), proxy acting as the server.

    Postgres' rules are kept where they are visible to clients: the user name in the message is
    ignored, extensions after the nonce are skipped, a nonce that is not this exchange's (a
    replay) is a protocol violation ("invalid SCRAM response"), a wrong proof is an
    authentication failure, and there is no server-final message after a failure.
    """

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        doomed: bool = False,
        nonce: bytes | None = None,
        channel_binding: bytes | None = None,
    ) -> None:
        """``doomed`` runs the full exchange but always fails (unknown user, unusable secret).

        ``channel_binding`` is the ``tls-server-end-point`` data of this TLS connection (the
        hash of the proxy's certificate), given when SCRAM-SHA-256-PLUS is offered.
        """
        self._verifier = verifier
        self._doomed = doomed
        self._channel_binding = channel_binding
        self._cbind_data = b""  # what the client must send back in c= after the GS2 header
        self._server_nonce = _nonce() if nonce is None else nonce
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""
        self._stage = 0
        self.client_key: bytes | None = None  # set once a proof has been verified

    def handle_client_first(self, data: bytes, *, plus: bool = False) -> bytes:
        """Parse client-first-message, return server-first-message.

        ``plus``: the client selected SCRAM-SHA-256-PLUS (only valid with ``channel_binding``).
        """
        if self._stage != 0:
            raise RuntimeError("client-first-message already handled")
        self._stage = 1
        _check_text(data)
        if plus and self._channel_binding is None:
            raise RuntimeError("SCRAM-SHA-256-PLUS selected but no channel binding data")
        flag = data[:1]
        end = 1  # where the channel-binding field ends
        if flag == b"p":
            if not plus:
                raise fatal(
                    PROTOCOL_VIOLATION,
                    _MALFORMED,
                    detail="The client selected SCRAM-SHA-256 without channel binding, "
                    "but the SCRAM message includes channel binding data.",
                )
            end = data.find(b",")
            if data[1:2] != b"=" or end < 0:
                raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Comma expected.")
            cbname = data[2:end]
            if cbname != CBIND_TYPE:
                name = cbname.decode("ascii", "replace")
                raise fatal(PROTOCOL_VIOLATION, f'unsupported SCRAM channel-binding type "{name}"')
            assert self._channel_binding is not None
            self._cbind_data = self._channel_binding
        elif flag == b"y" and self._channel_binding is not None:
            raise fatal(
                PROTOCOL_VIOLATION,
                "SCRAM channel binding negotiation error",
                detail="The client supports SCRAM channel binding but thinks the server does "
                "not.  However, this server does support channel binding.",
            )
        elif flag not in (b"n", b"y"):
            raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Unexpected channel-binding flag.")
        elif plus:
            raise fatal(
                PROTOCOL_VIOLATION,
                _MALFORMED,
                detail="The client selected SCRAM-SHA-256-PLUS, "
                "but the SCRAM message does not include channel binding data.",
            )
        if data[end : end + 1] != b",":
            raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Comma expected.")
        authzid = data[end + 1 : end + 2]
        if authzid == b"a":
            raise fatal(
                FEATURE_NOT_SUPPORTED, "client uses authorization identity, but it is not supported"
            )
        if authzid != b",":
            raise fatal(
                PROTOCOL_VIOLATION,
                _MALFORMED,
                detail="Unexpected attribute in client-first-message.",
            )
        self._gs2_header = data[: end + 2]
        self._client_first_bare = bare = data[end + 2 :]
        parts = bare.split(b",")
        if parts[0].startswith(b"m="):
            raise fatal(FEATURE_NOT_SUPPORTED, "client requires an unsupported SCRAM extension")
        _expect(parts[0], b"n", "client-first-message")  # ignored, as in Postgres
        client_nonce = _expect(parts[1] if len(parts) > 1 else b"", b"r", "client-first-message")
        if not client_nonce or not _printable(client_nonce):
            raise fatal(
                PROTOCOL_VIOLATION, _MALFORMED, detail="Non-printable characters in SCRAM nonce."
            )
        if not all(_is_attr(p) for p in parts[2:]):
            raise fatal(
                PROTOCOL_VIOLATION, _MALFORMED, detail="Garbage found in client-first-message."
            )
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = (
            b"r=" + self._nonce + b",s=" + _b64(v.salt) + b",i=" + str(v.iterations).encode()
        )
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes | None:
        """Check client-final-message; server-final-message, or None if authentication failed."""
        if self._stage != 1:
            raise RuntimeError("client-final-message out of order")
        self._stage = 2
        _check_text(data)
        parts = data.split(b",")
        binding = _b64decode(_expect(parts[0], b"c", "client-final-message")) or b""
        expected = self._gs2_header + self._cbind_data
        if not hmac.compare_digest(binding, expected):
            if self._cbind_data and binding.startswith(self._gs2_header):
                raise fatal(PROTOCOL_VIOLATION, "SCRAM channel binding check failed")
            raise fatal(
                PROTOCOL_VIOLATION,
                "unexpected SCRAM channel-binding attribute in client-final-message",
            )
        nonce = _expect(parts[1] if len(parts) > 1 else b"", b"r", "client-final-message")
        if len(parts) < 3 or not all(_is_attr(p) for p in parts[2:-1]):
            raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Malformed client-final-message.")
        proof = _b64decode(_expect(parts[-1], b"p", "client-final-message"))
        if proof is None or len(proof) != KEY_LENGTH:
            raise fatal(
                PROTOCOL_VIOLATION, _MALFORMED, detail="Malformed proof in client-final-message."
            )
        if not hmac.compare_digest(nonce, self._nonce):  # Postgres checks it first, too
            raise fatal(
                PROTOCOL_VIOLATION, "invalid SCRAM response", detail="Nonce does not match."
            )
        without_proof = data[: len(data) - len(parts[-1]) - 1]
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof

        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if not ok or self._doomed:
            return None
        self.client_key = client_key
        return b"v=" + _b64(_hmac(v.server_key, auth_message))


def _server_error(detail: str) -> PgError:
    return fatal(PROTOCOL_VIOLATION, "malformed SCRAM message from server", detail=detail)


class ScramClient:
    """The client side of one exchange (libpq's ``fe-auth-scram.c``), proxy logging in upstream.

    Like libpq it sends an empty user name (the server uses the startup packet's) and never uses
    channel binding. It refuses AuthenticationOk until the server has proved that it knows the
    verifier, so a fake server cannot skip the final step.

    With a :class:`ScramPassThrough` instead of a password, the proof is signed with the
    recovered ClientKey; that only works if the server announces the verifier's own salt and
    iteration count (the same verifier), else the exchange fails with a clear error.
    """

    def __init__(
        self,
        secret: str | ScramPassThrough,
        *,
        username: str = "",
        nonce: bytes | None = None,
        user: str = "",
    ) -> None:
        """``username``/``nonce`` exist for test vectors; leave them at their defaults.
        ``user`` only names the role in error messages."""
        self._secret = secret
        self._user = user
        name = username.replace("=", "=3D").replace(",", "=2C").encode("utf-8", "surrogateescape")
        self._client_nonce = _nonce() if nonce is None else nonce
        self._client_first_bare = b"n=" + name + b",r=" + self._client_nonce
        self._server_first = b""
        self._nonce = b""
        self._server_signature = b""
        self._stage = 0
        self.finished = False  # the server's signature has been verified

    def client_first(self) -> bytes:
        if self._stage != 0:
            raise RuntimeError("client-first-message already sent")
        self._stage = 1
        return b"n,," + self._client_first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """Check server-first-message, return client-final-message (runs PBKDF2, cached)."""
        salt, iterations = self.read_server_first(data)
        return self.client_final(self._keys(salt, iterations, None))

    async def handle_server_first_off_loop(self, data: bytes) -> bytes:
        """:meth:`handle_server_first` with an uncached PBKDF2 run in a worker thread."""
        salt, iterations = self.read_server_first(data)
        keys = None
        if isinstance(self._secret, str):
            keys = await salted_keys_off_loop(self._secret, salt, iterations)
        return self.client_final(self._keys(salt, iterations, keys))

    def read_server_first(self, data: bytes) -> tuple[bytes, int]:
        """Validate server-first-message; return the (salt, iterations) it announces."""
        if self._stage != 1:
            raise fatal(PROTOCOL_VIOLATION, "unexpected SCRAM challenge from server")
        self._stage = 2
        _check_server_text(data)
        parts = data.split(b",")
        if parts[0].startswith(b"e="):
            raise _server_error(f"Server reported error {parts[0][2:].decode(errors='replace')}.")
        nonce = _server_attr(parts, 0, b"r")
        salt = _b64decode(_server_attr(parts, 1, b"s"))
        iterations = _server_attr(parts, 2, b"i")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise _server_error("Invalid SCRAM response (nonce mismatch).")
        if not _printable(nonce):
            raise _server_error("Non-printable characters in SCRAM nonce.")
        if not salt:
            raise _server_error("Malformed SCRAM salt.")
        count = _iteration_count(iterations, 2**31 - 1)
        if count is None:
            raise _server_error("Malformed SCRAM iteration count.")
        if count > MAX_ITERATIONS:
            raise _server_error(
                f"SCRAM iteration count {count} is above pgproxy's limit of {MAX_ITERATIONS}."
            )
        if not all(_is_attr(p) for p in parts[3:]):
            raise _server_error("Garbage found at the end of server-first-message.")
        self._server_first = data
        self._nonce = nonce
        return salt, count

    def _keys(self, salt: bytes, iterations: int, derived: ScramKeys | None) -> ScramKeys:
        secret = self._secret
        if isinstance(secret, str):
            return derived or salted_keys(secret, salt, iterations)
        v = secret.verifier
        if salt != v.salt or iterations != v.iterations:
            raise fatal(
                INVALID_AUTHORIZATION_SPECIFICATION,
                f'SCRAM pass-through failed for user "{self._user}": the upstream server\'s '
                "SCRAM verifier is not the one pgproxy knows",
                detail="The upstream announced a different salt or iteration count.",
                hint="Copy the role's current verifier from pg_authid into pgproxy's "
                "configuration, or give pgproxy the upstream password.",
            )
        return keys_from_client_key(secret.client_key, v.server_key)

    def client_final(self, keys: ScramKeys) -> bytes:
        """client-final-message for the server-first-message already read, signed with keys."""
        without_proof = b"c=" + _b64(b"n,,") + b",r=" + self._nonce
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        proof = _xor(keys.client_key, _hmac(keys.stored_key, auth_message))
        self._server_signature = _hmac(keys.server_key, auth_message)
        return without_proof + b",p=" + _b64(proof)

    def handle_server_final(self, data: bytes) -> None:
        """Verify the server's signature; raise if it does not prove knowledge of the verifier."""
        if self._stage != 2:
            raise fatal(PROTOCOL_VIOLATION, "unexpected SCRAM final message from server")
        self._stage = 3
        _check_server_text(data)
        parts = data.split(b",")
        if parts[0].startswith(b"e="):
            raise _server_error(f"Server reported error {parts[0][2:].decode(errors='replace')}.")
        signature = _b64decode(_server_attr(parts, 0, b"v"))
        if signature is None or not hmac.compare_digest(signature, self._server_signature):
            raise fatal(PROTOCOL_VIOLATION, "incorrect server signature in SCRAM exchange")
        self.finished = True


def _check_server_text(data: bytes) -> None:
    if not data or b"\0" in data:
        raise _server_error("The message is empty or contains a NUL byte.")


def _server_attr(parts: list[bytes], index: int, name: bytes) -> bytes:
    part = parts[index] if index < len(parts) else b""
    if not part.startswith(name + b"="):
        raise _server_error(f'Expected attribute "{name.decode()}".')
    return part[2:]
