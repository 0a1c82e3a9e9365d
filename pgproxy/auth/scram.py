"""SCRAM-SHA-256 (RFC 5802, RFC 7677) secrets the way Postgres keeps them, and what both ends share.

Owns the keys a password yields (:class:`ScramKeys`), the stored verifier (:class:`ScramVerifier`),
pass-through credentials (:class:`ScramPassThrough`), the PBKDF2 cache, the mock salts for unknown
users and the pieces of message grammar both exchanges parse. The exchanges themselves are two
small state machines with no I/O, each in its own module: ``scram_server.py`` checks a client that
logs in to the proxy, ``scram_client.py`` logs the proxy in to an upstream server. The rule: this
module holds nothing of any one exchange, and whatever both exchanges need is here, once.

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
  own certificate, which the caller computes (``cbind.py``) and hands to the server side.

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

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS = 4096  # Postgres' default scram_iterations
SALT_LENGTH = 16  # SCRAM_DEFAULT_SALT_LEN
KEY_LENGTH = 32  # SHA-256 digest size
_RAW_NONCE_LENGTH = 18  # SCRAM_RAW_NONCE_LEN; base64 makes it 24 printable characters
_PREFIX = "SCRAM-SHA-256$"
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
    return hmac_sha256(_MOCK_KEY, user.encode("utf-8", "surrogateescape"))[:SALT_LENGTH]


def iteration_count(text: bytes | str, maximum: int) -> int | None:
    """A decimal count in 1..maximum, or None (length checked before int())."""
    if not (0 < len(text) <= _MAX_ITERATION_DIGITS and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if 1 <= value <= maximum else None


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """RFC 5802 ``HMAC``, with SHA-256."""
    return hmac.digest(key, msg, "sha256")


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def b64decode(data: bytes | str) -> bytes | None:
    """``data`` decoded, or None if it is not strict base64."""
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
    return keys_from_client_key(
        hmac_sha256(salted, b"Client Key"), hmac_sha256(salted, b"Server Key")
    )


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
        count = iteration_count(iterations, 2**31 - 1)  # Postgres' scram_iterations range
        if count is None:
            return None
        salt = b64decode(salt_b64)
        stored = b64decode(stored_b64)
        server = b64decode(server_b64)
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
            b64(x).decode() for x in (self.salt, self.stored_key, self.server_key)
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


# The message grammar both exchanges parse.


def new_nonce() -> bytes:
    """A fresh nonce: random bytes, base64-encoded (printable, no ',')."""
    return b64(secrets.token_bytes(_RAW_NONCE_LENGTH))


def is_printable(value: bytes) -> bool:
    """RFC 5802 ``printable``: 0x21-0x7E except ','."""
    return all(0x21 <= c <= 0x7E and c != 0x2C for c in value)


def is_attr(part: bytes) -> bool:
    """``attr-val``: one ASCII letter, '=', then anything (extension values may be empty)."""
    return len(part) >= 2 and chr(part[0]).isascii() and chr(part[0]).isalpha() and part[1] == 0x3D


_PARSED_SIZE = 1024
_parsed: dict[str, ScramVerifier | None] = {}


def parse_verifier(text: str) -> ScramVerifier | None:
    """:meth:`ScramVerifier.parse`, remembered for up to 1,024 secrets (then forgotten all at
    once): every login of a user parses the same stored verifier, twice (to check the proof,
    to learn pass-through)."""
    if text in _parsed:
        return _parsed.get(text)
    if len(_parsed) >= _PARSED_SIZE:
        _parsed.clear()
    verifier = _parsed[text] = ScramVerifier.parse(text)
    return verifier
