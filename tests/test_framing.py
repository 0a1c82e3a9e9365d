"""``framing.length_at``: native shifts in the compiled build, ``struct`` in pure Python; the
suite runs against both builds, so this pins that each gives what ``struct`` gives."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.protocol import framing


@settings(max_examples=500, deadline=None)
@given(st.integers(-(2**31), 2**31 - 1), st.binary(max_size=8), st.binary(max_size=8))
def test_length_at_reads_a_signed_big_endian_int32(value: int, before: bytes, after: bytes) -> None:
    buf = before + struct.pack("!i", value) + after
    assert framing.length_at(buf, len(before)) == (value,)
    assert framing.read_length(buf, len(before)) == value


def test_the_extremes_a_hostile_length_can_take() -> None:
    for raw, value in [
        (b"\xff\xff\xff\xff", -1),
        (b"\x80\x00\x00\x00", -(2**31)),
        (b"\x7f\xff\xff\xff", 2**31 - 1),
        (b"\x00\x00\x00\x04", 4),
    ]:
        assert framing.length_at(b"Q" + raw, 1) == (value,)


def test_a_type_table_marks_exactly_the_types_given() -> None:
    table = framing.type_table((ord("Q"), ord("P")))
    assert len(table) == 256
    assert [t for t in range(256) if table[t]] == [ord("P"), ord("Q")]
    assert framing.type_table(()) == bytes(256)


def test_frontend_limits_by_type_byte() -> None:
    assert framing.FRONTEND_LIMIT_OF[ord("Q")] == framing.LARGE_MESSAGE_LIMIT
    assert framing.FRONTEND_LIMIT_OF[ord("S")] == framing.SMALL_MESSAGE_LIMIT
    assert framing.FRONTEND_LIMIT_OF[ord("Z")] == 0  # a backend type: no client may send it
    assert {t for t in range(256) if framing.FRONTEND_LIMIT_OF[t]} == framing.FRONTEND_TYPES
