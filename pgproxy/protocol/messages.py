"""Builders and parsers for the protocol messages the proxy inspects or makes up.

Theory of operation: this module is the only place that knows a message's body layout (except
reading Bind and Execute whole, which only the admin console does: ``extended.py``). It is pure
(bytes in, values out; values in, bytes out) so it can be tested with bytes alone. The hot path
never decodes messages it merely forwards; it only calls a parser here for the few message
types whose content matters (see ``framing.py`` for how boundaries are found).

Strings are decoded as UTF-8 with ``surrogateescape`` so that any byte sequence round-trips
exactly; the proxy never re-encodes a client's text differently from how it arrived.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

# --- message type bytes (as ints: ``buf[i]`` yields an int) -----------------------------------

# Frontend (client -> server)
QUERY: Final = ord("Q")
PARSE: Final = ord("P")
BIND: Final = ord("B")
DESCRIBE: Final = ord("D")
EXECUTE: Final = ord("E")
CLOSE: Final = ord("C")
SYNC: Final = ord("S")
FLUSH: Final = ord("H")
TERMINATE: Final = ord("X")
FUNCTION_CALL: Final = ord("F")
COPY_DATA: Final = ord("d")
COPY_DONE: Final = ord("c")
COPY_FAIL: Final = ord("f")
PASSWORD: Final = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse

# Backend (server -> client)
AUTHENTICATION: Final = ord("R")
PARAMETER_STATUS: Final = ord("S")
BACKEND_KEY_DATA: Final = ord("K")
READY_FOR_QUERY: Final = ord("Z")
COMMAND_COMPLETE: Final = ord("C")
ERROR_RESPONSE: Final = ord("E")
NOTICE_RESPONSE: Final = ord("N")
NOTIFICATION_RESPONSE: Final = ord("A")
ROW_DESCRIPTION: Final = ord("T")
DATA_ROW: Final = ord("D")
EMPTY_QUERY_RESPONSE: Final = ord("I")
PARSE_COMPLETE: Final = ord("1")
BIND_COMPLETE: Final = ord("2")
CLOSE_COMPLETE: Final = ord("3")
NO_DATA: Final = ord("n")
PARAMETER_DESCRIPTION: Final = ord("t")
PORTAL_SUSPENDED: Final = ord("s")
COPY_IN_RESPONSE: Final = ord("G")
COPY_OUT_RESPONSE: Final = ord("H")
COPY_BOTH_RESPONSE: Final = ord("W")
FUNCTION_CALL_RESPONSE: Final = ord("V")
NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")

# Authentication request codes
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# Special startup-packet codes (in place of the protocol version)
PROTOCOL_3_0: Final = 3 << 16
PROTOCOL_3_2: Final = PROTOCOL_3_0 | 2
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

# Transaction status in ReadyForQuery
IDLE: Final = ord("I")
IN_TRANSACTION: Final = ord("T")
FAILED_TRANSACTION: Final = ord("E")

_I32: Final = struct.Struct("!i")
_I16: Final = struct.Struct("!h")
_HEADER = struct.Struct("!ci")
_2I32 = struct.Struct("!ii")


class ProtocolError(ValueError):
    """A message that does not follow the protocol (bad length, missing terminator...)."""


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _cstr(s: str) -> bytes:
    b = _enc(s)
    if b"\0" in b:
        raise ProtocolError("string contains a NUL byte")
    return b + b"\0"


def read_cstring(buf: bytes, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated string at ``pos``; return it and the position after the NUL."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("missing string terminator")
    return _dec(buf[pos:end]), end + 1


def message(type_: int, body: bytes = b"") -> bytes:
    """Frame one message: type byte, int32 length (counting itself), body."""
    return _HEADER.pack(bytes((type_,)), len(body) + 4) + body


# --- startup phase -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupMessage:
    version: int  # full (major << 16) | minor
    params: dict[str, str]
    unknown_protocol_options: tuple[str, ...] = ()  # `_pq_.*` names, which we do not support

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: bytes  # 4 bytes under 3.0; 4..256 under 3.2


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest

STARTUP_MAX_LENGTH = 10000  # Postgres' MAX_STARTUP_PACKET_LENGTH


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Parse a startup-phase packet body (everything after its int32 length)."""
    if len(body) < 4:
        raise ProtocolError("invalid length of startup packet")
    (code,) = _I32.unpack_from(body, 0)
    if code == CANCEL_REQUEST_CODE:
        # The key length is whatever remains (PROTOCOL-NOTES 26: 4..256 bytes under 3.2).
        if len(body) < 12 or len(body) > 4 + 4 + 256:
            raise ProtocolError("invalid length of cancel request")
        (pid,) = _I32.unpack_from(body, 4)
        return CancelRequest(pid, bytes(body[8:]))
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolError("invalid length of SSL request")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolError("invalid length of GSSENC request")
        return GSSENCRequest()
    if code >> 16 != 3:
        # Another major version: the caller refuses it; its body layout is not ours to judge.
        return StartupMessage(code, {})
    params: dict[str, str] = {}
    unknown: list[str] = []
    pos = 4
    while True:
        if pos >= len(body):
            raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
        if body[pos] == 0:
            if pos != len(body) - 1:
                raise ProtocolError(
                    "invalid startup packet layout: expected terminator as last byte"
                )
            break
        name, pos = read_cstring(body, pos)
        value, pos = read_cstring(body, pos)
        if name.startswith("_pq_."):
            unknown.append(name)
        else:
            params[name] = value
    return StartupMessage(code, params, tuple(unknown))


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _2I32.pack(8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _2I32.pack(8, GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = _2I32.pack(CANCEL_REQUEST_CODE, pid) + secret
    return _I32.pack(len(body) + 4) + body


def negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    body = _2I32.pack(PROTOCOL_3_0 | newest_minor, len(unsupported))
    body += b"".join(_cstr(n) for n in unsupported)
    return message(NEGOTIATE_PROTOCOL_VERSION, body)


# --- authentication ----------------------------------------------------------------------------


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(AUTHENTICATION, _I32.pack(code) + data)


def authentication_ok() -> bytes:
    return authentication(AUTH_OK)


def authentication_cleartext() -> bytes:
    return authentication(AUTH_CLEARTEXT)


def authentication_md5(salt: bytes) -> bytes:
    return authentication(AUTH_MD5, salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("authentication message too short")
    (code,) = _I32.unpack_from(body, 0)
    return code, bytes(body[4:])


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        name, pos = read_cstring(data, pos)
        out.append(name)
    return out


def password_message(data: bytes) -> bytes:
    """PasswordMessage / SASLResponse: the body is opaque bytes to the framing."""
    return message(PASSWORD, data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(PASSWORD, _cstr(mechanism) + _I32.pack(len(data)) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstring(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("SASLInitialResponse too short")
    (n,) = _I32.unpack_from(body, pos)
    pos += 4
    if n == -1:
        if pos != len(body):
            raise ProtocolError("SASLInitialResponse length mismatch")
        return mech, b""
    if n < 0 or pos + n != len(body):
        raise ProtocolError("SASLInitialResponse length mismatch")
    return mech, bytes(body[pos:])


def parse_password(body: bytes) -> bytes:
    """A cleartext or md5 PasswordMessage: a NUL-terminated string."""
    if not body or body[-1] != 0 or body.find(b"\0") != len(body) - 1:
        raise ProtocolError("invalid password packet")
    return bytes(body[:-1])


# --- session start-up and status ---------------------------------------------------------------


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, _cstr(name) + _cstr(value))


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0)
    value, _ = read_cstring(body, pos)
    return name, value


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(BACKEND_KEY_DATA, _I32.pack(pid) + secret)


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8:
        raise ProtocolError("BackendKeyData too short")
    (pid,) = _I32.unpack_from(body, 0)
    return pid, bytes(body[4:])


_RFQ = {
    s: message(READY_FOR_QUERY, bytes((s,))) for s in (IDLE, IN_TRANSACTION, FAILED_TRANSACTION)
}


def ready_for_query(status: int = IDLE) -> bytes:
    return _RFQ[status]


# --- queries and results -----------------------------------------------------------------------


def query(sql: str) -> bytes:
    return message(QUERY, _cstr(sql))


def parse_query(body: bytes) -> str:
    if not body or body.find(b"\0") != len(body) - 1:
        raise ProtocolError("invalid Query message")
    return _dec(body[:-1])


def command_complete(tag: str) -> bytes:
    return message(COMMAND_COMPLETE, _cstr(tag))


def parse_command_complete(body: bytes) -> str:
    tag, _ = read_cstring(body, 0)
    return tag


TEXT_OID = 25


def row_description(
    columns: Sequence[tuple[str, int]],
    sizes: Sequence[int] | None = None,
    formats: Sequence[int] | None = None,
) -> bytes:
    """RowDescription for computed columns: (name, type OID) each, type sizes (default -1,
    varlena) and format codes (default 0, text). Table OID and column number are 0."""
    body = _I16.pack(len(columns))
    for i, (name, type_oid) in enumerate(columns):
        size, fmt = sizes[i] if sizes else -1, formats[i] if formats else 0
        body += _cstr(name) + struct.pack("!ihihih", 0, 0, type_oid, size, -1, fmt)
    return message(ROW_DESCRIPTION, body)


def data_row(values: Sequence[str | bytes | None]) -> bytes:
    """DataRow: text values are encoded, bytes (binary-format values) sent as they are."""
    body = _I16.pack(len(values))
    for v in values:
        if v is None:
            body += _I32.pack(-1)
        else:
            b = _enc(v) if isinstance(v, str) else v
            body += _I32.pack(len(b)) + b
    return message(DATA_ROW, body)


def parameter_description(oids: Sequence[int]) -> bytes:
    oids_bytes = struct.pack(f"!{len(oids)}I", *oids)
    return message(PARAMETER_DESCRIPTION, _I16.pack(len(oids)) + oids_bytes)


SYNC_MESSAGE = message(SYNC)
FLUSH_MESSAGE = message(FLUSH)
TERMINATE_MESSAGE = message(TERMINATE)
EMPTY_QUERY_RESPONSE_MESSAGE = message(EMPTY_QUERY_RESPONSE)
PARSE_COMPLETE_MESSAGE = message(PARSE_COMPLETE)
BIND_COMPLETE_MESSAGE = message(BIND_COMPLETE)
CLOSE_COMPLETE_MESSAGE = message(CLOSE_COMPLETE)
NO_DATA_MESSAGE = message(NO_DATA)
PORTAL_SUSPENDED_MESSAGE = message(PORTAL_SUSPENDED)
COPY_DONE_MESSAGE = message(COPY_DONE)


def copy_fail(reason: str) -> bytes:
    return message(COPY_FAIL, _cstr(reason))


# --- errors and notices ------------------------------------------------------------------------


def error_response(fields: Mapping[str, str], *, notice: bool = False) -> bytes:
    body = b"".join(k.encode("ascii") + _cstr(v) for k, v in fields.items()) + b"\0"
    return message(NOTICE_RESPONSE if notice else ERROR_RESPONSE, body)


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse keyed by their one-letter code."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstring(body, pos + 1)
        out[code] = value
    return out


# --- notifications -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    pid: int
    channel: str
    payload: str = field(default="")


def notification_response(pid: int, channel: str, payload: str) -> bytes:
    return message(NOTIFICATION_RESPONSE, _I32.pack(pid) + _cstr(channel) + _cstr(payload))


def parse_notification(body: bytes) -> Notification:
    if len(body) < 4:
        raise ProtocolError("NotificationResponse too short")
    (pid,) = _I32.unpack_from(body, 0)
    channel, pos = read_cstring(body, 4)
    payload, _ = read_cstring(body, pos)
    return Notification(pid, channel, payload)


# --- extended protocol (only what the proxy needs to read) -------------------------------------


def parse_parse(body: bytes) -> tuple[str, str, list[int]]:
    """Parse message: statement name, query text, parameter type OIDs."""
    name, pos = read_cstring(body, 0)
    sql, pos = read_cstring(body, pos)
    if len(body) < pos + 2:
        raise ProtocolError("Parse message too short")
    (n,) = _I16.unpack_from(body, pos)
    pos += 2
    if n < 0 or len(body) != pos + 4 * n:
        raise ProtocolError("Parse message length mismatch")
    oids = list(struct.unpack_from(f"!{n}I", body, pos))
    return name, sql, oids


def parse_describe_or_close(body: bytes) -> tuple[int, str]:
    """Describe/Close: kind (``S`` statement or ``P`` portal) and name."""
    if len(body) < 2:
        raise ProtocolError("Describe/Close message too short")
    name, _ = read_cstring(body, 1)
    return body[0], name


def parse(name: str, sql: str, oids: Sequence[int] = ()) -> bytes:
    body = _cstr(name) + _cstr(sql) + _I16.pack(len(oids))
    body += struct.pack(f"!{len(oids)}I", *oids)
    return message(PARSE, body)


def parse_tail(sql: str, parameter_types: bytes) -> bytes:
    """A Parse body after the statement name: the text, then the parameter types as sent."""
    return _cstr(sql) + parameter_types


def bind(
    portal: str, statement: str, params: Sequence[bytes | None] = (), formats: Sequence[int] = ()
) -> bytes:
    """Bind with text parameters and the given result format codes (default: all text)."""
    body = _cstr(portal) + _cstr(statement) + _I16.pack(0) + _I16.pack(len(params))
    for p in params:
        body += _I32.pack(-1) if p is None else _I32.pack(len(p)) + p
    body += _I16.pack(len(formats)) + struct.pack(f"!{len(formats)}h", *formats)
    return message(BIND, body)


def describe(kind: str, name: str) -> bytes:
    return message(DESCRIBE, kind.encode("ascii") + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(EXECUTE, _cstr(portal) + _I32.pack(max_rows))


def close(kind: str, name: str) -> bytes:
    return message(CLOSE, kind.encode("ascii") + _cstr(name))
