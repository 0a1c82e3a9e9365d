"""Message boundaries and the length limits that bound every length field from the network.

Regular messages are ``type byte + int32 length (counting itself) + body``. The limits are
Postgres' own (``SocketBackend``, PROTOCOL-NOTES 8): a proxy-wide cap smaller than that would reject
legal traffic such as large bytea Binds and COPY rows.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from pgproxy.protocol import messages as m

HEADER_SIZE: Final = 5
LARGE_MESSAGE_LIMIT: Final = 0x3FFFFFFF  # PQ_LARGE_MESSAGE_LIMIT (1 GB - 1)
SMALL_MESSAGE_LIMIT: Final = 10000  # PQ_SMALL_MESSAGE_LIMIT
AUTH_MESSAGE_LIMIT: Final = 65535  # PG_MAX_AUTH_TOKEN_LENGTH

# Client messages Postgres allows to be large; every other type is capped at 10,000 bytes.
_LARGE_FRONTEND_TYPES: Final = frozenset(
    (m.QUERY, m.PARSE, m.BIND, m.COPY_DATA, m.FUNCTION_CALL, m.COPY_FAIL)
)
FRONTEND_TYPES: Final = frozenset(
    (
        m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.FLUSH,
        m.TERMINATE, m.FUNCTION_CALL, m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL,
    )
)  # fmt: skip

_I32: Final = struct.Struct("!i")


def length_at(buf: bytes, pos: int) -> tuple[int]:
    """The int32 at ``pos`` as a 1-tuple, as ``struct.unpack_from`` gives it; for hot loops
    (``length_at(buf, pos)[0]`` is ``read_length`` without its extra call).

    One result, two implementations: mypyc compiles this body to native indexing and shifts,
    where ``struct`` would be a call into the interpreter (9% of a compiled transaction);
    in pure Python ``struct``'s C code is twice as fast as this bytecode, so the name is
    rebound to it just below."""
    n = (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
    return (n - 0x1_0000_0000 if n > 0x7FFF_FFFF else n,)


if not __file__.endswith((".so", ".pyd")):  # pure Python; a compiled module's file is its .so
    globals()["length_at"] = _I32.unpack_from


def frontend_limit(type_: int) -> int:
    """The largest body+length a client may send for this message type."""
    return LARGE_MESSAGE_LIMIT if type_ in _LARGE_FRONTEND_TYPES else SMALL_MESSAGE_LIMIT


def read_length(buf: bytes | bytearray, pos: int) -> int:
    """The int32 length at ``pos`` (the byte after the type)."""
    return int(_I32.unpack_from(buf, pos)[0])


def type_table(types: Iterable[int]) -> bytes:
    """256 bytes: ``table[t]`` is 1 for the message types given, 0 for the rest. Hot loops
    index it rather than test set membership: no hashing, and native code when compiled."""
    wanted = frozenset(types)
    return bytes(1 if t in wanted else 0 for t in range(256))


# By type byte: the largest body+length a client may send, 0 for a type it may not send. Hot
# loops index it and call ``check_frontend_header`` only to report what is wrong.
FRONTEND_LIMIT_OF: Final = tuple(
    frontend_limit(t) if t in FRONTEND_TYPES else 0 for t in range(256)
)


def check_frontend_header(type_: int, length: int) -> None:
    """Raise ProtocolError for an unknown type or a length outside Postgres' bounds."""
    if type_ not in FRONTEND_TYPES:
        raise m.ProtocolError(f"invalid frontend message type {type_}")
    if length < 4 or length > frontend_limit(type_):
        raise m.ProtocolError(f"invalid message length {length} for message type {chr(type_)!r}")


def check_backend_length(length: int) -> None:
    if length < 4 or length > LARGE_MESSAGE_LIMIT:
        raise m.ProtocolError(f"invalid message length {length} from server")
