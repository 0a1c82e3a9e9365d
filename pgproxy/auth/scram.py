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

Messages are handled as bytes, never decoded: the AuthMessage must be exactly what was sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache

from scramp.utils import ScramException, saslprep  # type: ignore[import-untyped]

from pgproxy.protocol.errors import FEATURE_NOT_SUPPORTED, PROTOCOL_VIOLATION, PgError, fatal

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # Postgres' default scram_iterations
SALT_LENGTH = 16  # SCRAM_DEFAULT_SALT_LEN
KEY_LENGTH = 32  # SHA-256 digest size
_RAW_NONCE_LENGTH = 18  # SCRAM_RAW_NONCE_LEN; base64 makes it 24 printable characters
_PREFIX = "SCRAM-SHA-256$"
_MALFORMED = "malformed SCRAM message"

# A per-process key for mock salts, so an unknown user always gets the same salt (a changing
# salt would tell a prober the user does not exist), like Postgres' mock_auth_nonce.
_MOCK_KEY = secrets.token_bytes(32)


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


@lru_cache(maxsize=1024)
def salted_keys(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """Run PBKDF2 (the expensive part) once per (password, salt, iterations) per process."""
    salted = hashlib.pbkdf2_hmac("sha256", normalize_password(password), salt, iterations)
    return keys_from_client_key(_hmac(salted, b"Client Key"), _hmac(salted, b"Server Key"))


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
        if not (iterations.isascii() and iterations.isdigit()) or int(iterations) < 1:
            return None
        salt = _b64decode(salt_b64)
        stored = _b64decode(stored_b64)
        server = _b64decode(server_b64)
        if not salt or stored is None or server is None:
            return None
        if len(stored) != KEY_LENGTH or len(server) != KEY_LENGTH:
            return None
        return cls(int(iterations), salt, stored, server)

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
        salt = _hmac(_MOCK_KEY, user.encode("utf-8", "surrogateescape"))[:SALT_LENGTH]
        return cls(DEFAULT_ITERATIONS, salt, secrets.token_bytes(32), secrets.token_bytes(32))

    def __str__(self) -> str:
        salt, stored, server = (
            _b64(x).decode() for x in (self.salt, self.stored_key, self.server_key)
        )
        return f"{_PREFIX}{self.iterations}:{salt}${stored}:{server}"


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
    ignored, extensions after the nonce are skipped, a wrong nonce or proof is an authentication
    failure (not a protocol violation), and there is no server-final message after a failure.
    """

    def __init__(
        self, verifier: ScramVerifier, *, doomed: bool = False, nonce: bytes | None = None
    ) -> None:
        """``doomed`` runs the full exchange but always fails (unknown user, unusable secret)."""
        self._verifier = verifier
        self._doomed = doomed
        self._server_nonce = _nonce() if nonce is None else nonce
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""
        self._stage = 0
        self.client_key: bytes | None = None  # set once a proof has been verified

    def handle_client_first(self, data: bytes) -> bytes:
        """Parse client-first-message, return server-first-message."""
        if self._stage != 0:
            raise RuntimeError("client-first-message already handled")
        self._stage = 1
        _check_text(data)
        flag = data[:1]
        if flag == b"p":
            raise fatal(
                PROTOCOL_VIOLATION,
                _MALFORMED,
                detail="The client selected SCRAM-SHA-256 without channel binding, "
                "but the SCRAM message includes channel binding data.",
            )
        if flag not in (b"n", b"y"):  # 'y': client could bind, thinks we cannot; we have no TLS
            raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Unexpected channel-binding flag.")
        if data[1:2] != b",":
            raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Comma expected.")
        if data[2:3] == b"a":
            raise fatal(
                FEATURE_NOT_SUPPORTED, "client uses authorization identity, but it is not supported"
            )
        if data[2:3] != b",":
            raise fatal(
                PROTOCOL_VIOLATION,
                _MALFORMED,
                detail="Unexpected attribute in client-first-message.",
            )
        self._gs2_header = data[:3]
        self._client_first_bare = bare = data[3:]
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
        binding = _b64decode(_expect(parts[0], b"c", "client-final-message"))
        if binding != self._gs2_header:
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
        without_proof = data[: len(data) - len(parts[-1]) - 1]
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof

        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if not ok or self._doomed or not hmac.compare_digest(nonce, self._nonce):
            return None
        self.client_key = client_key
        return b"v=" + _b64(_hmac(v.server_key, auth_message))


def _server_error(detail: str) -> PgError:
    return fatal(PROTOCOL_VIOLATION, "malformed SCRAM message from server", detail=detail)


class ScramClient:
    """The client side of one exchange (libpq's ``fe-auth-scram.c``), proxy logging in upstream.

    Like libpq it sends an empty user name (the server uses the startup packet's) and never uses
    channel binding (no TLS upstream yet). It refuses AuthenticationOk until the server has proved
    that it knows the verifier, so a fake server cannot skip the final step.
    """

    def __init__(self, password: str, *, username: str = "", nonce: bytes | None = None) -> None:
        """``username``/``nonce`` exist for test vectors; leave them at their defaults."""
        self._password = password
        name = username.replace("=", "=3D").replace(",", "=2C").encode("utf-8", "surrogateescape")
        self._client_nonce = _nonce() if nonce is None else nonce
        self._client_first_bare = b"n=" + name + b",r=" + self._client_nonce
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
        if not (iterations.isascii() and iterations.isdigit()) or not 1 <= int(iterations) < 2**31:
            raise _server_error("Malformed SCRAM iteration count.")
        if not all(_is_attr(p) for p in parts[3:]):
            raise _server_error("Garbage found at the end of server-first-message.")

        keys = salted_keys(self._password, salt, int(iterations))
        without_proof = b"c=" + _b64(b"n,,") + b",r=" + nonce
        auth_message = self._client_first_bare + b"," + data + b"," + without_proof
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
