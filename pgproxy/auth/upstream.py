"""The proxy authenticating to an upstream Postgres: the proxy plays libpq.

Theory of operation: after the startup packet is sent, :func:`authenticate_upstream` answers the
server's Authentication requests until AuthenticationOk. Cleartext, md5 and SCRAM-SHA-256 are
supported (no channel binding towards the upstream). Besides a password, the proxy can log in
with pass-through credentials (``credentials.py``): an md5 hash answers md5, a SCRAM verifier
plus a client's recovered ClientKey answers SCRAM. An uncached PBKDF2 for a password runs in a
worker thread, never on the event loop. Every failure is a FATAL
:class:`PgError`: the server's own ErrorResponse keeps its SQLSTATE (28P01, 3D000, ...); anything
the proxy cannot follow is 08P01. The password never appears in a message or a log line.
"""

from __future__ import annotations

import hashlib

from pgproxy.auth import scram
from pgproxy.auth.channel import MessageChannel
from pgproxy.auth.credentials import Md5PassThrough, UpstreamSecret
from pgproxy.auth.scram_client import ScramClient
from pgproxy.protocol import framing
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import (
    PROTOCOL_VIOLATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
    PgError,
    fatal,
)

# Authentication codes the proxy cannot answer, for a readable error.
_UNSUPPORTED = {
    2: "Kerberos V5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI",
    9: "SSPI",
}


async def authenticate_upstream(
    chan: MessageChannel, user: str, password: UpstreamSecret | None
) -> None:
    """Log in as ``user``; return once the server sent AuthenticationOk.

    Only one method request is accepted per connection, and after SCRAM has started only its
    continuation is: a server (or a man in the middle) cannot switch to cleartext halfway, nor
    send AuthenticationOk before proving that it knows the SCRAM verifier.
    """
    client: ScramClient | None = None
    requested = False
    while True:
        code, data = await _read_request(chan)
        if code == m.AUTH_OK:
            if client is not None and not client.finished:
                raise fatal(
                    PROTOCOL_VIOLATION,
                    "upstream sent AuthenticationOk before the SCRAM exchange completed",
                )
            return
        if code in (m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL):
            if client is None:
                raise fatal(PROTOCOL_VIOLATION, "upstream sent a SASL message out of sequence")
            if code == m.AUTH_SASL_CONTINUE:
                chan.write(m.password_message(await client.handle_server_first_off_loop(data)))
            else:
                client.handle_server_final(data)
            continue
        if requested:
            raise fatal(PROTOCOL_VIOLATION, f"upstream sent a second authentication request {code}")
        requested = True
        if code == m.AUTH_CLEARTEXT:
            secret = _need_password(user, password, "password")
            chan.write(m.password_message(_encode(secret) + b"\0"))
        elif code == m.AUTH_MD5:
            if len(data) != 4:
                raise fatal(
                    PROTOCOL_VIOLATION, "upstream sent an md5 request without a 4-byte salt"
                )
            if isinstance(password, Md5PassThrough):
                response = md5_response_from_hash(password.hash, data)
            else:
                response = md5_response(user, _need_password(user, password, "md5"), data)
            chan.write(m.password_message(response + b"\0"))
        elif code == m.AUTH_SASL:
            if not isinstance(password, str | scram.ScramPassThrough):
                password = _need_password(user, password, "SCRAM-SHA-256")  # raises
            try:
                mechanisms = m.parse_sasl_mechanisms(data)
            except m.ProtocolError:
                raise fatal(
                    PROTOCOL_VIOLATION, "malformed SASL mechanism list from upstream"
                ) from None
            if scram.MECHANISM not in mechanisms:
                raise fatal(
                    PROTOCOL_VIOLATION,
                    "none of the upstream's SASL authentication mechanisms are supported: "
                    + ", ".join(mechanisms),
                )
            client = ScramClient(password, user=user)
            chan.write(m.sasl_initial_response(scram.MECHANISM, client.client_first()))
        else:
            name = _UNSUPPORTED.get(code, "unknown")
            raise fatal(
                PROTOCOL_VIOLATION,
                f"upstream requested an unsupported authentication method: {name} (code {code})",
            )


async def _read_request(chan: MessageChannel) -> tuple[int, bytes]:
    """The next Authentication request; an ErrorResponse becomes the server's own error."""
    while True:
        try:
            type_, body = await chan.read_message(framing.AUTH_MESSAGE_LIMIT)
            if type_ == m.ERROR_RESPONSE:
                raise PgError.from_fields(m.parse_error_fields(body))
            if type_ == m.NOTICE_RESPONSE:  # allowed at any time; nothing to do with it here
                continue
            if type_ == m.NEGOTIATE_PROTOCOL_VERSION:
                continue  # asked for 3.2, a server before 18 speaks 3.0: either suits the proxy
            if type_ != m.AUTHENTICATION:
                raise fatal(
                    PROTOCOL_VIOLATION,
                    f"expected authentication request from upstream, got message type {type_}",
                )
            return m.parse_authentication(body)
        except m.ProtocolError as e:
            raise fatal(PROTOCOL_VIOLATION, f"invalid message from upstream: {e}") from None


def _need_password(user: str, password: UpstreamSecret | None, method: str) -> str:
    if isinstance(password, str):
        return password
    if password is None:
        raise fatal(
            SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            f'upstream requires a password for user "{user}"',
        )
    raise fatal(
        SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        f'upstream asks for {method} authentication for user "{user}", but pgproxy only '
        "holds a verifier of another kind for that user",
        hint="give pgproxy the upstream password (database url or password key)",
    )


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    """``"md5" + md5(md5(password + user).hex + salt).hex``, what PasswordMessage carries."""
    inner = hashlib.md5(_encode(password + user)).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


def md5_response_from_hash(stored: str, salt: bytes) -> bytes:
    """The same response from the stored ``md5...`` hash, without the password."""
    return b"md5" + hashlib.md5(stored[3:].encode("ascii") + salt).hexdigest().encode("ascii")
