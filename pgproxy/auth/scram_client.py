"""The client side of SCRAM-SHA-256: the proxy logging in to an upstream server.

Owns :class:`ScramClient`, a sans-IO state machine (libpq's ``fe-auth-scram.c``): bytes go in,
bytes come out, ``upstream.py`` moves them over the wire. Whatever the server sends that does
not parse raises a FATAL :class:`PgError`. The rule: trust nothing the server says until it has
proved that it knows the verifier (AuthenticationOk before that is refused), and bound the work
it can make the proxy do (:data:`MAX_ITERATIONS`).
"""

from __future__ import annotations

import hmac

from pgproxy.auth.scram import (
    ScramKeys,
    ScramPassThrough,
    b64,
    b64decode,
    hmac_sha256,
    is_attr,
    is_printable,
    iteration_count,
    keys_from_client_key,
    new_nonce,
    salted_keys,
    salted_keys_off_loop,
    xor,
)
from pgproxy.protocol.errors import (
    INVALID_AUTHORIZATION_SPECIFICATION,
    PROTOCOL_VIOLATION,
    PgError,
    fatal,
)

# Upstream iteration counts above this are refused before any PBKDF2 runs: a hostile or
# misconfigured server announcing 2**31 - 1 would pin a worker thread for minutes per login.
MAX_ITERATIONS = 10_000_000


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
        self._client_nonce = new_nonce() if nonce is None else nonce
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
        parts = self._server_message(data, 1, "challenge")
        nonce = _server_attr(parts, 0, b"r")
        salt = b64decode(_server_attr(parts, 1, b"s"))
        iterations = _server_attr(parts, 2, b"i")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise _server_error("Invalid SCRAM response (nonce mismatch).")
        if not is_printable(nonce):
            raise _server_error("Non-printable characters in SCRAM nonce.")
        if not salt:
            raise _server_error("Malformed SCRAM salt.")
        count = iteration_count(iterations, 2**31 - 1)
        if count is None:
            raise _server_error("Malformed SCRAM iteration count.")
        if count > MAX_ITERATIONS:
            raise _server_error(
                f"SCRAM iteration count {count} is above pgproxy's limit of {MAX_ITERATIONS}."
            )
        if not all(is_attr(p) for p in parts[3:]):
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
        without_proof = b"c=" + b64(b"n,,") + b",r=" + self._nonce
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        proof = xor(keys.client_key, hmac_sha256(keys.stored_key, auth_message))
        self._server_signature = hmac_sha256(keys.server_key, auth_message)
        return without_proof + b",p=" + b64(proof)

    def _server_message(self, data: bytes, stage: int, what: str) -> list[bytes]:
        """The attributes of the server's message expected at ``stage`` (then the next stage
        begins): out of turn, malformed, or an ``e=`` error from the server raises."""
        if self._stage != stage:
            raise fatal(PROTOCOL_VIOLATION, f"unexpected SCRAM {what} from server")
        self._stage = stage + 1
        _check_server_text(data)
        parts = data.split(b",")
        if parts[0].startswith(b"e="):
            raise _server_error(f"Server reported error {parts[0][2:].decode(errors='replace')}.")
        return parts

    def handle_server_final(self, data: bytes) -> None:
        """Verify the server's signature; raise if it does not prove knowledge of the verifier."""
        parts = self._server_message(data, 2, "final message")
        signature = b64decode(_server_attr(parts, 0, b"v"))
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
