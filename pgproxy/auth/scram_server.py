"""The server side of SCRAM-SHA-256[-PLUS]: a client logging in to the proxy.

Owns :class:`ScramServer`, a sans-IO state machine (Postgres' ``auth-scram.c``): bytes go in,
bytes come out, ``frontend.py`` moves them over the wire. A malformed message raises a FATAL
:class:`PgError` (08P01, or 0A000 for features Postgres does not support either); a wrong
password is not an exception here: :meth:`ScramServer.handle_client_final` returns None and the
caller reports 28P01. The rule: answer as Postgres would, and let a doomed exchange (unknown
user, unusable secret) run and fail exactly like a wrong password, with the same work, so a
prober learns nothing from it.
"""

from __future__ import annotations

import hashlib
import hmac

from pgproxy.auth.scram import (
    KEY_LENGTH,
    ScramVerifier,
    b64,
    b64decode,
    hmac_sha256,
    is_attr,
    is_printable,
    new_nonce,
    xor,
)
from pgproxy.protocol.errors import FEATURE_NOT_SUPPORTED, PROTOCOL_VIOLATION, fatal

CBIND_TYPE = b"tls-server-end-point"  # the only channel binding type Postgres supports
_MALFORMED = "malformed SCRAM message"


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
        self._server_nonce = new_nonce() if nonce is None else nonce
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
        if not client_nonce or not is_printable(client_nonce):
            raise fatal(
                PROTOCOL_VIOLATION, _MALFORMED, detail="Non-printable characters in SCRAM nonce."
            )
        if not all(is_attr(p) for p in parts[2:]):
            raise fatal(
                PROTOCOL_VIOLATION, _MALFORMED, detail="Garbage found in client-first-message."
            )
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = (
            b"r=" + self._nonce + b",s=" + b64(v.salt) + b",i=" + str(v.iterations).encode()
        )
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes | None:
        """Check client-final-message; server-final-message, or None if authentication failed."""
        if self._stage != 1:
            raise RuntimeError("client-final-message out of order")
        self._stage = 2
        _check_text(data)
        parts = data.split(b",")
        binding = b64decode(_expect(parts[0], b"c", "client-final-message")) or b""
        expected = self._gs2_header + self._cbind_data
        if not hmac.compare_digest(binding, expected):
            if self._cbind_data and binding.startswith(self._gs2_header):
                raise fatal(PROTOCOL_VIOLATION, "SCRAM channel binding check failed")
            raise fatal(
                PROTOCOL_VIOLATION,
                "unexpected SCRAM channel-binding attribute in client-final-message",
            )
        nonce = _expect(parts[1] if len(parts) > 1 else b"", b"r", "client-final-message")
        if len(parts) < 3 or not all(is_attr(p) for p in parts[2:-1]):
            raise fatal(PROTOCOL_VIOLATION, _MALFORMED, detail="Malformed client-final-message.")
        proof = b64decode(_expect(parts[-1], b"p", "client-final-message"))
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
        client_key = xor(proof, hmac_sha256(v.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if not ok or self._doomed:
            return None
        self.client_key = client_key
        return b"v=" + b64(hmac_sha256(v.server_key, auth_message))
