"""The messages workers send each other over their private unix sockets (``peers.py``).

Owns every byte of that channel: how a request and an answer are built and parsed. One
request per connection; a frame is a kind byte, a 4-byte big-endian body length, the body:

* ``C`` a CancelRequest as the client sent it (its length word included); not answered: the
  owner closes once it has acted (Postgres answers a cancel with nothing either).
* ``S`` "your snapshot", no body; answered ``K`` + the JSON of ``capture.take`` (a
  :class:`~pgproxy.admin.snapshot.Snapshot`).
* ``X`` a console control command, body the JSON ``[verb, argument]``; answered ``K`` + the
  JSON command tag once it is done, or ``E`` + the JSON ``[sqlstate, message]`` it failed with.

Rule: every length is checked against its kind's bound before anything is read or allocated
(a cancel as Postgres bounds it, a command 1 KiB, a snapshot ``SNAPSHOT_MAX``), and whatever
does not parse as the kind it claims is a :class:`~pgproxy.protocol.messages.ProtocolError`;
reading is the caller's, under its own timeout.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any, Final, cast

from pgproxy.admin.snapshot import Snapshot
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError

__all__ = [
    "CANCEL",
    "CONTROL",
    "SNAPSHOT",
    "SNAPSHOT_MAX",
    "Control",
    "cancel_request",
    "control_request",
    "done",
    "failed",
    "read_answer",
    "read_request",
    "snapshot_answer",
    "snapshot_request",
]

CANCEL: Final = ord("C")
SNAPSHOT: Final = ord("S")
CONTROL: Final = ord("X")
_DONE: Final = ord("K")
_FAILED: Final = ord("E")
_HEAD: Final = struct.Struct("!BI")
SNAPSHOT_MAX: Final = 256 << 20  # JSON bytes: ~500 bytes a client or server, so ~500k of them
_CANCEL_MIN, _CANCEL_MAX = 16, 4 + 4 + 4 + 256  # length, code, pid, key (protocol 3.2: <= 256)
_CONTROL_MAX: Final = 1024
_ERROR_MAX: Final = 64 * 1024
_REQUEST_MAX: Final = {CANCEL: _CANCEL_MAX, SNAPSHOT: 0, CONTROL: _CONTROL_MAX}
_SNAPSHOT_KEYS: Final = frozenset(Snapshot.__required_keys__)


@dataclass(frozen=True)
class Control:
    """A console control command to run on the receiving worker."""

    verb: str
    arg: str


Request = m.CancelRequest | Control | None  # None: "your snapshot"


# --- building ---------------------------------------------------------------------------------


def _frame(kind: int, body: bytes) -> bytes:
    return _HEAD.pack(kind, len(body)) + body


def cancel_request(request: m.CancelRequest) -> bytes:
    return _frame(CANCEL, m.cancel_request(request.pid, request.secret))


def snapshot_request() -> bytes:
    return _frame(SNAPSHOT, b"")


def control_request(verb: str, arg: str) -> bytes:
    body = json.dumps([verb, arg]).encode()
    if len(body) > _CONTROL_MAX:
        raise ValueError("control command too long")  # the console's grammar never makes one
    return _frame(CONTROL, body)


def snapshot_answer(snapshot: Snapshot) -> bytes:
    return _frame(_DONE, json.dumps(snapshot, separators=(",", ":")).encode())


def done(tag: str) -> bytes:
    return _frame(_DONE, json.dumps(tag).encode())


def failed(error: PgError) -> bytes:
    message = error.message[: _ERROR_MAX // 16]  # an escaped character takes <= 12 bytes
    return _frame(_FAILED, json.dumps([error.sqlstate, message]).encode())


# --- parsing ----------------------------------------------------------------------------------


async def _read_frame(reader: asyncio.StreamReader, limits: dict[int, int]) -> tuple[int, bytes]:
    try:
        kind, length = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    except asyncio.IncompleteReadError as exc:
        raise m.ProtocolError("the peer closed without a whole message") from exc
    limit = limits.get(kind)
    if limit is None:
        raise m.ProtocolError(f"unknown peer message {kind:#x}")
    if length > limit:
        raise m.ProtocolError(f"peer message {chr(kind)!r} too long ({length} bytes)")
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise m.ProtocolError("the peer closed within a message") from exc


async def read_request(reader: asyncio.StreamReader) -> Request:
    """The request a peer sent (ProtocolError if it is not one)."""
    kind, body = await _read_frame(reader, _REQUEST_MAX)
    if kind == SNAPSHOT:
        return None
    if kind == CANCEL:
        if len(body) < _CANCEL_MIN or int.from_bytes(body[:4], "big") != len(body):
            raise m.ProtocolError("bad forwarded cancel request")
        packet = m.parse_startup_packet(body[4:])
        if not isinstance(packet, m.CancelRequest):
            raise m.ProtocolError("not a cancel request")
        return packet
    verb, arg = _json(body, list)
    if not isinstance(verb, str) or not isinstance(arg, str):
        raise m.ProtocolError("bad control command")
    return Control(verb, arg)


async def read_answer(reader: asyncio.StreamReader, kind: int) -> Snapshot | str:
    """The answer to a request of ``kind`` (SNAPSHOT or CONTROL): a snapshot, or a control
    command's tag; the PgError a control command failed with is raised."""
    limit = SNAPSHOT_MAX if kind == SNAPSHOT else _CONTROL_MAX
    status, body = await _read_frame(reader, {_DONE: limit, _FAILED: _ERROR_MAX})
    if status == _FAILED:
        sqlstate, message = _json(body, list)
        raise PgError(str(sqlstate), str(message))
    if kind == SNAPSHOT:
        snapshot = _json(body, dict)
        if not snapshot.keys() >= _SNAPSHOT_KEYS:
            raise m.ProtocolError("not a snapshot")
        return cast(Snapshot, snapshot)
    return str(_json(body, str))


def _json(body: bytes, kind: type[Any]) -> Any:
    try:
        value = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise m.ProtocolError(f"bad peer message: {exc}") from None
    if not isinstance(value, kind) or (kind is list and len(value) != 2):
        raise m.ProtocolError("bad peer message")
    return value
