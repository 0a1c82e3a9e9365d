"""Bind and Execute read whole, as a server reads them.

The proxy forwards these messages to servers after reading at most their names (the client
session does it inline); only where it answers the extended protocol itself, in the admin
console (``pgproxy.admin``), does it need the rest: how many parameters a Bind carries, the
result format codes it asks for, and an Execute's row limit.

Rule: pure, as ``messages.py`` (bytes in, values out; ProtocolError for anything malformed),
and the only place that knows these two layouts; every other message's is ``messages.py``'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pgproxy.protocol.messages import ProtocolError, read_cstring

_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    params: int  # how many parameter values it carries (the values themselves are skipped)
    formats: tuple[int, ...]  # result format codes: none (all text), one for all, or one each


def parse_bind(body: bytes) -> Bind:
    portal, pos = read_cstring(body, 0)
    statement, pos = read_cstring(body, pos)
    pos = _counted("h", body, pos)[1]  # parameter format codes
    (count,), pos = _unpack(_I16, body, pos)
    if count < 0:
        raise ProtocolError("negative parameter count in Bind message")
    for _ in range(count):
        (size,), pos = _unpack(_I32, body, pos)
        if size < -1:
            raise ProtocolError("invalid parameter length in Bind message")
        pos += max(size, 0)
    formats, pos = _counted("h", body, pos)
    if pos != len(body):
        raise ProtocolError("Bind message length mismatch")
    return Bind(portal, statement, count, formats)


def bind_parameter(body: bytes, index: int) -> tuple[bytes | None, int]:
    """A Bind's parameter ``index`` (0-based) and its format code (0 text, 1 binary); None
    for NULL or a parameter the Bind does not carry."""
    _, pos = read_cstring(body, 0)
    _, pos = read_cstring(body, pos)
    codes, pos = _counted("h", body, pos)
    (count,), pos = _unpack(_I16, body, pos)
    if not 0 <= index < count:
        return None, 0
    for n in range(count):
        (size,), pos = _unpack(_I32, body, pos)
        if n == index:
            if size < 0 or len(body) < pos + size:
                return None, 0
            code = codes[0] if len(codes) == 1 else codes[index] if codes else 0
            return body[pos : pos + size], code
        pos += max(size, 0)
    return None, 0


def parse_execute(body: bytes) -> tuple[str, int]:
    """Execute: the portal's name and the most rows to return (0: all)."""
    portal, pos = read_cstring(body, 0)
    (max_rows,), pos = _unpack(_I32, body, pos)
    if pos != len(body):
        raise ProtocolError("Execute message length mismatch")
    return portal, max_rows


def _unpack(fmt: struct.Struct, body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """``fmt`` read at ``pos``, and the position after it."""
    if len(body) < pos + fmt.size:
        raise ProtocolError("message too short")
    return fmt.unpack_from(body, pos), pos + fmt.size


def _counted(item: str, body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """An int16 count, then that many ``item`` (a struct format letter)."""
    (n,), pos = _unpack(_I16, body, pos)
    if n < 0:
        raise ProtocolError("negative count in message")
    return _unpack(struct.Struct(f"!{n}{item}"), body, pos)
