"""Sans-IO behaviour of pgproxy.protocol.messages, framing and PgError's wire form."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.protocol import errors, extended, framing
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError

# --- strategies ---------------------------------------------------------------------------------

# Any text without NUL: letters, CJK, emoji... (surrogates cannot be encoded as UTF-8).
PLAIN_TEXT = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)))
# Arbitrary bytes (invalid UTF-8 included) as the parsers see them: surrogateescape-decoded.
ESCAPED_TEXT = st.binary().map(lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape"))
PG_TEXT = st.one_of(PLAIN_TEXT, ESCAPED_TEXT)
PG_NAME = PG_TEXT.filter(bool)  # an empty name would read as the list terminator
INT32 = st.integers(-(2**31), 2**31 - 1)
CANCEL_KEY = st.binary(min_size=4, max_size=256)
SPECIAL_CODES = (m.CANCEL_REQUEST_CODE, m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE)
VERSION = st.one_of(
    st.sampled_from([m.PROTOCOL_3_0, m.PROTOCOL_3_0 | 2, 2 << 16]),
    st.integers(0, 2**31 - 1).filter(lambda v: v not in SPECIAL_CODES),
)

_I32 = struct.Struct("!i")
ROUND_TRIP = settings(max_examples=40, deadline=None)


def split(msg: bytes) -> tuple[int, bytes]:
    """Type byte and body of a framed message, checking its length word on the way."""
    (length,) = _I32.unpack_from(msg, 1)
    assert length == len(msg) - 1
    return msg[0], msg[5:]


def startup_body(packet: bytes) -> bytes:
    (length,) = _I32.unpack_from(packet, 0)
    assert length == len(packet)
    return packet[4:]


def enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


# --- startup phase ------------------------------------------------------------------------------


@ROUND_TRIP
@given(
    version=VERSION.filter(lambda v: v >> 16 == 3),
    params=st.dictionaries(PG_NAME.filter(lambda k: not k.startswith("_pq_.")), PG_TEXT),
    options=st.dictionaries(PG_TEXT.map(lambda s: "_pq_." + s), PG_TEXT, max_size=3),
)
def test_startup_message_round_trips_params_and_sets_aside_pq_options(
    version: int, params: dict[str, str], options: dict[str, str]
) -> None:
    merged = {**options, **params}
    packet = m.startup_message(merged, version)
    parsed = m.parse_startup_packet(startup_body(packet))
    assert parsed == m.StartupMessage(version, params, tuple(options))
    assert isinstance(parsed, m.StartupMessage)
    assert parsed.minor == version & 0xFFFF


@ROUND_TRIP
@given(name=ESCAPED_TEXT.filter(lambda s: s and not s.startswith("_pq_.")), value=ESCAPED_TEXT)
def test_startup_message_keeps_undecodable_bytes_verbatim(name: str, value: str) -> None:
    packet = m.startup_message({name: value})
    assert enc(name) + b"\0" + enc(value) + b"\0\0" == packet[8:]
    parsed = m.parse_startup_packet(startup_body(packet))
    assert isinstance(parsed, m.StartupMessage)
    assert [(enc(k), enc(v)) for k, v in parsed.params.items()] == [(enc(name), enc(value))]


def test_startup_packet_with_unicode_and_invalid_utf8_values() -> None:
    body = _I32.pack(m.PROTOCOL_3_0) + b"user\0\xc3\xa9l\xc3\xa8ve\0application_name\0\xff\xfe\0\0"
    parsed = m.parse_startup_packet(body)
    assert parsed == m.StartupMessage(
        m.PROTOCOL_3_0, {"user": "élève", "application_name": "\udcff\udcfe"}
    )


def test_startup_message_refuses_a_nul_inside_a_value() -> None:
    with pytest.raises(m.ProtocolError):
        m.startup_message({"user": "a\0b"})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0\3\0", id="short-version"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0), id="version-only-no-terminator"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0) + b"user\0bob\0", id="no-final-terminator"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0) + b"user\0bob", id="value-without-nul"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0) + b"user", id="name-without-nul"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0) + b"user\0", id="name-without-value"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0) + b"\0\0", id="bytes-after-terminator"),
        pytest.param(_I32.pack(m.PROTOCOL_3_0) + b"a\0b\0\0x", id="garbage-after-terminator"),
    ],
)
def test_malformed_startup_packet_raises_protocol_error(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_startup_packet(body)


def test_startup_packet_with_no_params_is_accepted() -> None:
    assert m.parse_startup_packet(_I32.pack(m.PROTOCOL_3_0) + b"\0") == m.StartupMessage(
        m.PROTOCOL_3_0, {}
    )


@ROUND_TRIP
@given(pid=INT32, key=CANCEL_KEY)
def test_cancel_request_round_trips_keys_of_4_to_256_bytes(pid: int, key: bytes) -> None:
    packet = m.cancel_request(pid, key)
    assert len(packet) == 12 + len(key)
    assert m.parse_startup_packet(startup_body(packet)) == m.CancelRequest(pid, key)


@ROUND_TRIP
@given(pid=INT32, key=st.one_of(st.binary(max_size=3), st.binary(min_size=257, max_size=300)))
def test_cancel_request_with_key_outside_4_to_256_bytes_is_rejected(pid: int, key: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_startup_packet(startup_body(m.cancel_request(pid, key)))


def test_cancel_request_without_pid_is_rejected() -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_startup_packet(_I32.pack(m.CANCEL_REQUEST_CODE))


def test_ssl_request_is_eight_bytes_and_parses() -> None:
    packet = m.ssl_request()
    assert packet == b"\0\0\0\x08\x04\xd2\x16\x2f"
    assert m.parse_startup_packet(startup_body(packet)) == m.SSLRequest()


def test_gssenc_request_parses() -> None:
    assert m.parse_startup_packet(_I32.pack(m.GSSENC_REQUEST_CODE)) == m.GSSENCRequest()


@pytest.mark.parametrize("code", [m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE])
def test_encryption_request_with_trailing_bytes_is_rejected(code: int) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_startup_packet(_I32.pack(code) + b"\0")


@ROUND_TRIP
@given(minor=st.integers(0, 0xFFFF), unsupported=st.lists(PG_TEXT, max_size=5))
def test_negotiate_protocol_version_lists_newest_minor_and_unsupported_options(
    minor: int, unsupported: list[str]
) -> None:
    type_, body = split(m.negotiate_protocol_version(minor, unsupported))
    assert type_ == ord("v")
    version, count = struct.unpack_from("!ii", body)
    assert version == (3 << 16) | minor
    assert count == len(unsupported)
    names = body[8:].split(b"\0")
    assert names[-1] == b""  # every name NUL-terminated, nothing after the last
    assert names[:-1] == [enc(n) for n in unsupported]


# --- authentication -----------------------------------------------------------------------------


@ROUND_TRIP
@given(code=INT32, data=st.binary())
def test_authentication_round_trips(code: int, data: bytes) -> None:
    type_, body = split(m.authentication(code, data))
    assert type_ == ord("R")
    assert m.parse_authentication(body) == (code, data)


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (m.authentication_ok(), (0, b"")),
        (m.authentication_cleartext(), (3, b"")),
        (m.authentication_md5(b"salt"), (5, b"salt")),
    ],
)
def test_fixed_authentication_requests_carry_their_code(
    msg: bytes, expected: tuple[int, bytes]
) -> None:
    type_, body = split(msg)
    assert type_ == ord("R")
    assert m.parse_authentication(body) == expected


@ROUND_TRIP
@given(mechanisms=st.lists(PG_NAME, max_size=4))
def test_authentication_sasl_round_trips_mechanism_list(mechanisms: list[str]) -> None:
    code, data = m.parse_authentication(split(m.authentication_sasl(mechanisms))[1])
    assert code == m.AUTH_SASL
    assert data.endswith(b"\0")
    assert m.parse_sasl_mechanisms(data) == mechanisms


def test_authentication_sasl_scram_bytes() -> None:
    assert m.authentication_sasl(["SCRAM-SHA-256"]) == (b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0")


def test_authentication_shorter_than_its_code_is_rejected() -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_authentication(b"\0\0\0")


def test_sasl_mechanism_without_nul_is_rejected() -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_sasl_mechanisms(b"SCRAM-SHA-256\0SCRAM")


@ROUND_TRIP
@given(mechanism=PG_TEXT, data=st.binary())
def test_sasl_initial_response_round_trips(mechanism: str, data: bytes) -> None:
    type_, body = split(m.sasl_initial_response(mechanism, data))
    assert type_ == ord("p")
    assert m.parse_sasl_initial_response(body) == (mechanism, data)


def test_sasl_initial_response_with_length_minus_one_has_no_data() -> None:
    assert m.parse_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff") == (
        "SCRAM-SHA-256",
        b"",
    )


@ROUND_TRIP
@given(data=st.binary(max_size=20), delta=st.integers(-20, 20).filter(bool))
def test_sasl_initial_response_with_wrong_length_is_rejected(data: bytes, delta: int) -> None:
    declared = len(data) + delta
    if declared == -1:
        declared = -2  # -1 legitimately means "no initial response"
    body = b"SCRAM-SHA-256\0" + _I32.pack(declared) + data
    with pytest.raises(m.ProtocolError):
        m.parse_sasl_initial_response(body)


def test_sasl_initial_response_with_length_minus_one_and_trailing_data_is_rejected() -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xffn,,n=,r=abc")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"SCRAM-SHA-256", id="mechanism-without-nul"),
        pytest.param(b"SCRAM-SHA-256\0\0\0", id="truncated-length"),
        pytest.param(b"SCRAM-SHA-256\0\0\0\0\x05abc", id="truncated-data"),
    ],
)
def test_truncated_sasl_initial_response_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_sasl_initial_response(body)


@ROUND_TRIP
@given(password=st.binary().map(lambda b: b.replace(b"\0", b"")))
def test_password_message_round_trips(password: bytes) -> None:
    type_, body = split(m.password_message(password + b"\0"))
    assert type_ == ord("p")
    assert m.parse_password(body) == password


@pytest.mark.parametrize("body", [b"", b"secret", b"sec\0ret\0", b"secret\0\0"])
def test_malformed_password_message_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_password(body)


# --- session start-up and status ----------------------------------------------------------------


@ROUND_TRIP
@given(name=PG_TEXT, value=PG_TEXT)
def test_parameter_status_round_trips(name: str, value: str) -> None:
    type_, body = split(m.parameter_status(name, value))
    assert type_ == ord("S")
    assert m.parse_parameter_status(body) == (name, value)


@pytest.mark.parametrize("body", [b"", b"TimeZone", b"TimeZone\0UTC"])
def test_parameter_status_without_terminators_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_parameter_status(body)


@ROUND_TRIP
@given(pid=INT32, key=CANCEL_KEY)
def test_backend_key_data_round_trips(pid: int, key: bytes) -> None:
    type_, body = split(m.backend_key_data(pid, key))
    assert type_ == ord("K")
    assert m.parse_backend_key_data(body) == (pid, key)


@pytest.mark.parametrize("size", range(8))
def test_backend_key_data_shorter_than_eight_bytes_is_rejected(size: int) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_backend_key_data(bytes(range(size)))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (m.IDLE, b"Z\0\0\0\x05I"),
        (m.IN_TRANSACTION, b"Z\0\0\0\x05T"),
        (m.FAILED_TRANSACTION, b"Z\0\0\0\x05E"),
    ],
)
def test_ready_for_query_bytes(status: int, expected: bytes) -> None:
    assert m.ready_for_query(status) == expected


# --- queries and results ------------------------------------------------------------------------


@ROUND_TRIP
@given(sql=PG_TEXT)
def test_query_round_trips(sql: str) -> None:
    type_, body = split(m.query(sql))
    assert type_ == ord("Q")
    assert m.parse_query(body) == sql


@pytest.mark.parametrize("body", [b"", b"SELECT 1"])
def test_query_without_terminator_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_query(body)


def test_query_with_bytes_after_its_string_is_rejected() -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_query(b"LISTEN a\0; garbage\0")


@ROUND_TRIP
@given(tag=PG_TEXT)
def test_command_complete_round_trips(tag: str) -> None:
    type_, body = split(m.command_complete(tag))
    assert type_ == ord("C")
    assert m.parse_command_complete(body) == tag


def test_command_complete_without_terminator_is_rejected() -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_command_complete(b"SELECT 1")


def test_fixed_messages_bytes() -> None:
    assert m.SYNC_MESSAGE == b"S\0\0\0\x04"
    assert m.FLUSH_MESSAGE == b"H\0\0\0\x04"
    assert m.TERMINATE_MESSAGE == b"X\0\0\0\x04"
    assert m.COPY_DONE_MESSAGE == b"c\0\0\0\x04"
    assert m.copy_fail("no") == b"f\0\0\0\x07no\0"


# --- errors and notices -------------------------------------------------------------------------

FIELD_CODE = st.characters(min_codepoint=1, max_codepoint=127)


@ROUND_TRIP
@given(fields=st.dictionaries(FIELD_CODE, PG_TEXT), notice=st.booleans())
def test_error_response_round_trips_fields(fields: dict[str, str], notice: bool) -> None:
    type_, body = split(m.error_response(fields, notice=notice))
    assert type_ == (ord("N") if notice else ord("E"))
    assert body.endswith(b"\0")
    assert m.parse_error_fields(body) == fields


@pytest.mark.parametrize("body", [b"SERROR", b"SERROR\0M"])
def test_error_field_without_terminator_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_error_fields(body)


OPTIONAL_TEXT = st.one_of(st.none(), PG_NAME)


@ROUND_TRIP
@given(
    sqlstate=st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
    message=PG_TEXT,
    severity=st.sampled_from(errors.SEVERITIES),
    detail=OPTIONAL_TEXT,
    hint=OPTIONAL_TEXT,
)
def test_pg_error_survives_the_wire(
    sqlstate: str, message: str, severity: str, detail: str | None, hint: str | None
) -> None:
    err = PgError(sqlstate, message, severity=severity, detail=detail, hint=hint)
    fields = m.parse_error_fields(split(m.error_response(err.fields()))[1])
    back = PgError.from_fields(fields)
    assert (back.sqlstate, back.message, back.severity, back.detail, back.hint) == (
        sqlstate,
        message,
        severity,
        detail,
        hint,
    )
    assert back.fatal == (severity in ("FATAL", "PANIC"))


def test_pg_error_fields_come_in_postgres_order() -> None:
    err = PgError("08P01", "bad", severity="FATAL", detail="d", hint="h")
    assert list(err.fields().items()) == [
        ("S", "FATAL"),
        ("V", "FATAL"),
        ("C", "08P01"),
        ("M", "bad"),
        ("D", "d"),
        ("H", "h"),
    ]
    assert "D" not in PgError("08P01", "bad").fields()


def test_pg_error_from_fields_tolerates_missing_code() -> None:
    err = PgError.from_fields({"S": "ERROR", "M": "boom"})
    assert (err.sqlstate, err.message, err.severity) == (errors.INTERNAL_ERROR, "boom", "ERROR")


def test_pg_error_from_fields_tolerates_no_fields_at_all() -> None:
    err = PgError.from_fields(m.parse_error_fields(b"\0"))
    assert (err.sqlstate, err.message, err.severity, err.detail, err.hint) == (
        errors.INTERNAL_ERROR,
        "unknown error",
        "ERROR",
        None,
        None,
    )


def test_pg_error_from_fields_prefers_unlocalized_severity() -> None:
    err = PgError.from_fields({"S": "FATAL-LOCALISÉ", "V": "FATAL", "C": "57P01", "M": "bye"})
    assert err.severity == "FATAL"
    assert err.fatal
    assert PgError.from_fields({"S": "PANIC", "C": "XX000", "M": "x"}).severity == "PANIC"


# --- notifications ------------------------------------------------------------------------------


@ROUND_TRIP
@given(pid=INT32, channel=PG_TEXT, payload=PG_TEXT)
def test_notification_response_round_trips(pid: int, channel: str, payload: str) -> None:
    type_, body = split(m.notification_response(pid, channel, payload))
    assert type_ == ord("A")
    assert m.parse_notification(body) == m.Notification(pid, channel, payload)


@pytest.mark.parametrize("body", [b"", b"\0\0\0", b"\0\0\0\x01chan", b"\0\0\0\x01chan\0payload"])
def test_truncated_notification_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_notification(body)


# --- extended protocol --------------------------------------------------------------------------


@ROUND_TRIP
@given(name=PG_TEXT, sql=PG_TEXT, oids=st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_parse_message_round_trips(name: str, sql: str, oids: list[int]) -> None:
    type_, body = split(m.parse(name, sql, oids))
    assert type_ == ord("P")
    assert m.parse_parse(body) == (name, sql, oids)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"s1\0SELECT $1", id="sql-without-nul"),
        pytest.param(b"s1\0SELECT $1\0", id="no-count"),
        pytest.param(b"s1\0SELECT $1\0\0", id="half-count"),
        pytest.param(b"s1\0SELECT $1\0\0\x01", id="missing-oid"),
        pytest.param(b"s1\0SELECT $1\0\0\x01\0\0\0", id="truncated-oid"),
        pytest.param(b"s1\0SELECT $1\0\0\x01\0\0\0\x17\0", id="extra-byte"),
        pytest.param(b"s1\0SELECT $1\0\xff\xff", id="negative-count"),
    ],
)
def test_malformed_parse_message_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_parse(body)


def _bind_params(body: bytes) -> list[bytes | None]:
    """Decode the parameter values of a Bind body (no format codes, as bind() writes it)."""
    pos = body.index(b"\0") + 1
    pos = body.index(b"\0", pos) + 1
    (nformats,) = struct.unpack_from("!h", body, pos)
    assert nformats == 0
    (nparams,) = struct.unpack_from("!h", body, pos + 2)
    pos += 4
    out: list[bytes | None] = []
    for _ in range(nparams):
        (n,) = _I32.unpack_from(body, pos)
        pos += 4
        if n == -1:
            out.append(None)
        else:
            out.append(body[pos : pos + n])
            pos += n
    return out


@ROUND_TRIP
@given(
    portal=PG_TEXT,
    statement=PG_TEXT,
    params=st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=10),
    formats=st.lists(st.sampled_from([0, 1]), max_size=5),
)
def test_bind_round_trips_names_values_and_formats(
    portal: str, statement: str, params: list[bytes | None], formats: list[int]
) -> None:
    type_, body = split(m.bind(portal, statement, params, formats))
    assert type_ == ord("B")
    bind = extended.parse_bind(body)
    assert (bind.portal, bind.statement, bind.params) == (portal, statement, len(params))
    assert bind.formats == tuple(formats)
    assert _bind_params(body) == params


@pytest.mark.parametrize(
    "body",
    [b"", b"portal", b"portal\0stmt", b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0", b"\0\0\xff\xff"],
)
def test_malformed_bind_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        extended.parse_bind(body)


def test_execute_round_trips() -> None:
    assert extended.parse_execute(split(m.execute("p", 7))[1]) == ("p", 7)


@pytest.mark.parametrize(("builder", "type_"), [(m.describe, "D"), (m.close, "C")])
@ROUND_TRIP
@given(kind=st.sampled_from("SP"), name=PG_TEXT)
def test_describe_and_close_round_trip(
    builder: Callable[[str, str], bytes], type_: str, kind: str, name: str
) -> None:
    got_type, body = split(builder(kind, name))
    assert got_type == ord(type_)
    assert m.parse_describe_or_close(body) == (ord(kind), name)


@pytest.mark.parametrize("body", [b"", b"S", b"Sname"])
def test_malformed_describe_or_close_is_rejected(body: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.parse_describe_or_close(body)


@ROUND_TRIP
@given(portal=PG_TEXT, max_rows=INT32)
def test_execute_carries_portal_and_row_limit(portal: str, max_rows: int) -> None:
    type_, body = split(m.execute(portal, max_rows))
    assert type_ == ord("E")
    assert body == enc(portal) + b"\0" + _I32.pack(max_rows)


# --- framing ------------------------------------------------------------------------------------

BUILT_MESSAGES = [
    m.authentication_ok(),
    m.authentication_md5(b"abcd"),
    m.authentication_sasl(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
    m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=nonce"),
    m.password_message(b"secret\0"),
    m.parameter_status("TimeZone", "Europe/Paris"),
    m.backend_key_data(1234, b"\1\2\3\4"),
    m.ready_for_query(m.IN_TRANSACTION),
    m.query("SELECT 'é'"),
    m.command_complete("INSERT 0 1"),
    m.error_response({"S": "ERROR", "C": "42601", "M": "syntax error"}),
    m.error_response({"S": "NOTICE", "M": "hi"}, notice=True),
    m.notification_response(42, "chan", "payload"),
    m.negotiate_protocol_version(0, ["_pq_.x"]),
    m.parse("s", "SELECT $1", [23]),
    m.bind("p", "s", [b"1", None]),
    m.describe("S", "s"),
    m.execute("p", 10),
    m.close("P", "p"),
    m.copy_fail("abort"),
    m.SYNC_MESSAGE,
    m.FLUSH_MESSAGE,
    m.TERMINATE_MESSAGE,
    m.EMPTY_QUERY_RESPONSE_MESSAGE,
    m.PARSE_COMPLETE_MESSAGE,
    m.BIND_COMPLETE_MESSAGE,
    m.CLOSE_COMPLETE_MESSAGE,
    m.NO_DATA_MESSAGE,
    m.COPY_DONE_MESSAGE,
]


@pytest.mark.parametrize("msg", BUILT_MESSAGES, ids=lambda b: chr(b[0]))
def test_built_message_length_field_counts_itself_and_body(msg: bytes) -> None:
    assert framing.read_length(msg, 1) == len(msg) - 1


@ROUND_TRIP
@given(type_=st.integers(0, 255), body=st.binary(max_size=300))
def test_message_frames_any_body(type_: int, body: bytes) -> None:
    msg = m.message(type_, body)
    assert msg[0] == type_
    assert framing.read_length(msg, 1) == len(msg) - 1 == len(body) + 4
    assert msg[framing.HEADER_SIZE :] == body


@pytest.mark.parametrize(
    "packet",
    [m.ssl_request(), m.cancel_request(1, b"\0" * 32), m.startup_message({"user": "u"})],
    ids=["ssl", "cancel", "startup"],
)
def test_startup_packet_length_field_counts_the_whole_packet(packet: bytes) -> None:
    assert framing.read_length(packet, 0) == len(packet)


LARGE_TYPES = [ord(c) for c in "QPBdFf"]
SMALL_TYPES = [ord(c) for c in "DECSHXc"]


def test_frontend_types_are_exactly_what_postgres_reads_after_startup() -> None:
    assert set(LARGE_TYPES + SMALL_TYPES) == framing.FRONTEND_TYPES


@pytest.mark.parametrize("type_", LARGE_TYPES, ids=chr)
def test_large_frontend_types_accept_up_to_one_gigabyte(type_: int) -> None:
    framing.check_frontend_header(type_, 4)
    framing.check_frontend_header(type_, 10001)
    framing.check_frontend_header(type_, 0x3FFFFFFF)
    with pytest.raises(m.ProtocolError):
        framing.check_frontend_header(type_, 0x40000000)


@pytest.mark.parametrize("type_", SMALL_TYPES, ids=chr)
def test_small_frontend_types_accept_up_to_10000_bytes(type_: int) -> None:
    framing.check_frontend_header(type_, 4)
    framing.check_frontend_header(type_, 10000)
    with pytest.raises(m.ProtocolError):
        framing.check_frontend_header(type_, 10001)


@pytest.mark.parametrize("type_", LARGE_TYPES + SMALL_TYPES, ids=chr)
def test_frontend_length_below_four_is_rejected(type_: int) -> None:
    for length in (-(2**31), -1, 0, 3):
        with pytest.raises(m.ProtocolError):
            framing.check_frontend_header(type_, length)


def test_unknown_frontend_types_are_rejected() -> None:
    unknown = sorted(set(range(256)) - set(LARGE_TYPES + SMALL_TYPES))
    assert ord("p") in unknown  # PasswordMessage is only legal during authentication
    for type_ in unknown:
        with pytest.raises(m.ProtocolError):
            framing.check_frontend_header(type_, 4)


@pytest.mark.parametrize("length", [-1, 0, 3, 0x40000000])
def test_backend_length_outside_bounds_is_rejected(length: int) -> None:
    with pytest.raises(m.ProtocolError):
        framing.check_backend_length(length)


@pytest.mark.parametrize("length", [4, 10001, 0x3FFFFFFF])
def test_backend_length_within_bounds_is_accepted(length: int) -> None:
    framing.check_backend_length(length)


# --- malformed input fuzzing --------------------------------------------------------------------

PARSERS: list[Callable[[bytes], object]] = [
    m.parse_startup_packet,
    m.parse_authentication,
    m.parse_sasl_mechanisms,
    m.parse_sasl_initial_response,
    m.parse_password,
    m.parse_parameter_status,
    m.parse_backend_key_data,
    m.parse_query,
    m.parse_command_complete,
    m.parse_error_fields,
    m.parse_notification,
    m.parse_parse,
    extended.parse_bind,
    extended.parse_execute,
    m.parse_describe_or_close,
]

# Bytes that steer the fuzzer into the interesting branches (special startup codes, lengths).
FUZZ_BODY = st.one_of(
    st.binary(max_size=64),
    st.tuples(
        st.sampled_from([*SPECIAL_CODES, m.PROTOCOL_3_0]).map(_I32.pack),
        st.binary(max_size=64),
    ).map(b"".join),
    st.lists(
        st.sampled_from([b"\0", b"\xff", b"a", b"\0\0\0\x04", b"\xff\xff\xff\xff", b"\xc3"])
    ).map(b"".join),
)


@settings(max_examples=250, deadline=None)
@given(body=FUZZ_BODY)
def test_every_parser_returns_or_raises_protocol_error_on_any_bytes(body: bytes) -> None:
    for parser in PARSERS:
        try:
            parser(body)
        except m.ProtocolError:
            pass


STRICT_BODIES: list[tuple[Callable[[bytes], object], bytes]] = [
    (m.parse_startup_packet, startup_body(m.startup_message({"user": "bob", "database": "db"}))),
    (m.parse_sasl_initial_response, split(m.sasl_initial_response("SCRAM-SHA-256", b"n,,"))[1]),
    (m.parse_parameter_status, split(m.parameter_status("TimeZone", "UTC"))[1]),
    (m.parse_query, split(m.query("SELECT 1"))[1]),
    (m.parse_notification, split(m.notification_response(7, "chan", "hello"))[1]),
    (m.parse_parse, split(m.parse("s1", "SELECT $1, $2", [23, 25]))[1]),
    (m.parse_describe_or_close, split(m.describe("S", "s1"))[1]),
    (extended.parse_bind, split(m.bind("p", "s", [b"x", None], [1, 0]))[1]),
    (extended.parse_execute, split(m.execute("p", 10))[1]),
    (m.parse_password, b"secret\0"),
    (m.parse_backend_key_data, split(m.backend_key_data(1, b"\0\0\0\0"))[1]),
]


@pytest.mark.parametrize(
    ("parser", "body"), STRICT_BODIES, ids=[p.__name__ for p, _ in STRICT_BODIES]
)
def test_every_truncation_of_a_message_is_rejected(
    parser: Callable[[bytes], object], body: bytes
) -> None:
    parser(body)  # the whole body is valid
    for cut in range(len(body)):
        with pytest.raises(m.ProtocolError):
            parser(body[:cut])


def test_other_major_versions_are_returned_unparsed_for_the_caller_to_refuse() -> None:
    packet = m.startup_message({"user": "u"}, 2 << 16)
    assert m.parse_startup_packet(startup_body(packet)) == m.StartupMessage(2 << 16, {})
    # Even a body that is not a valid v3 parameter list: the version is what gets refused.
    body = (2 << 16).to_bytes(4, "big") + b"user\0u\0database"
    assert m.parse_startup_packet(body) == m.StartupMessage(2 << 16, {})
