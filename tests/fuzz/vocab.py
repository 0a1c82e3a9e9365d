"""Frontend messages worth fuzzing with, built from small numbers: one vocabulary for atheris
(which decodes them from its bytes, :func:`decode`) and hypothesis (which draws them).

The vocabulary leans on what has gone wrong in poolers: statement and portal names that clash,
are unknown or are the proxy's own (``P0_1``), Bind parameter counts that disagree with the
bytes, COPY messages in and out of COPY, declared lengths far above what follows (2^31 and
over, negative), messages cut anywhere, and a second StartupMessage where a regular message
belongs.
"""

from __future__ import annotations

import struct
from typing import Final

from pgproxy.protocol import messages as m

STARTUP: Final = m.startup_message({"user": "bench", "database": "bench"})
NAMES: Final = ("", "a", "b", "P0_1", "x" * 80, "\udcff")
SQL: Final = (
    "SELECT 1",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "COPY t FROM STDIN",
    "COPY t TO STDOUT",
    "ERROR",
    "DISCARD ALL",
    "DEALLOCATE ALL",
    "SET work_mem = '8MB'",
    "",
    "SELECT 1; SELECT 2",
)
# Lengths a header may declare: at and above 2^31 (negative as int32), Postgres' limits and
# one past them, and the too-small ones.
LENGTHS: Final = (0x7FFFFFFF, -1, -0x80000000, 0x3FFFFFFF, 0x40000000, 10000, 10001, 3, 0)
TYPES: Final = b"QPBDESHdcfFXpY\0"
OPS: Final = 17


def _i32(n: int) -> bytes:
    return struct.pack("!i", n)


def build(op: int, arg: int, blob: bytes) -> bytes:
    """Message ``op`` (0..OPS-1) with parameter ``arg`` (0..255) and payload ``blob``."""
    name = NAMES[arg % len(NAMES)]
    other = NAMES[(arg // len(NAMES)) % len(NAMES)]
    kind = "SP"[arg & 1]
    if op == 0:
        return m.query(SQL[arg % len(SQL)])
    if op == 1:
        return m.parse(name, SQL[(arg // 8) % len(SQL)], [23] * (arg % 3))
    if op == 2:
        return m.bind(other, name, [blob] * (arg % 3))
    if op == 3:  # a parameter count the bytes do not match
        body = b"\0" + m._cstr(name) + b"\0\0" + struct.pack("!h", arg - 128) + blob
        return m.message(m.BIND, body)
    if op == 4:
        return m.describe(kind, name)
    if op == 5:
        return m.execute(name, arg % 3)
    if op == 6:
        return m.close(kind, name)
    if op == 7:
        return m.SYNC_MESSAGE
    if op == 8:
        return m.FLUSH_MESSAGE
    if op == 9:
        return m.message(m.COPY_DATA, blob)
    if op == 10:
        return m.COPY_DONE_MESSAGE
    if op == 11:
        return m.message(m.COPY_FAIL, blob.replace(b"\0", b"") + b"\0")
    if op == 12:
        return m.message(m.FUNCTION_CALL, _i32(arg) + blob)
    if op == 13:  # any type byte, any body
        return m.message(TYPES[arg % len(TYPES)], blob)
    if op == 14:  # a declared length and only part (or none) of the body
        declared = LENGTHS[(arg >> 4) % len(LENGTHS)]
        return bytes((TYPES[(arg & 15) % len(TYPES)],)) + _i32(declared) + blob
    if op == 15:  # a second startup packet where a message belongs
        return STARTUP if arg & 1 else m.ssl_request()
    return m.TERMINATE_MESSAGE if arg < 32 else blob


def decode(data: bytes) -> tuple[list[bytes], int]:
    """Messages from fuzz bytes (3 bytes and a blob each) and the read size to feed them in."""
    if not data:
        return [], 1
    chunk = (data[0] % 64 + 1) if data[0] < 192 else 1 << 20
    out, pos = [], 1
    while pos + 3 <= len(data):
        op, arg, size = data[pos], data[pos + 1], data[pos + 2] % 24
        blob = data[pos + 3 : pos + 3 + size]
        pos += 3 + size
        out.append(build(op % OPS, arg, blob))
    return out, chunk


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]
