"""The messages workers send each other over their private unix sockets (``peers.py``).

Owns every byte of that channel: how a request and an answer are built and parsed. One
request per connection; a frame is a kind byte, a 4-byte big-endian body length, the body:

* ``C`` a CancelRequest as the client sent it (its length word included); not answered: the
  owner closes once it has acted (Postgres answers a cancel with nothing either).
* ``S`` "your snapshot", no body; answered ``K`` + the JSON of ``capture.take`` (a
  :class:`~pgproxy.admin.snapshot.Snapshot`).
* ``X`` a console control command, body the JSON ``[verb, argument]``; answered ``K`` + the
  JSON command tag once it is done, or ``E`` + the JSON ``[sqlstate, message]`` it failed with.

For NOTIFY attribution across workers (``pgproxy.pubsub.siblings``), a server is the JSON
``[host, port, backend pid]`` of a pooled server connection:

* ``O`` the sender's servers opened or closed, ``[worker, opened, [server, ...]]``; answered
  ``K`` + ``null`` once recorded.
* ``L`` "your servers", ``[worker]`` (the asker, which just started: what was said of its
  predecessor's servers no longer holds); answered ``K`` + ``[server, ...]``.
* ``W`` "which virtual PID holds each of these servers now", ``[host, port, [pid, ...]]``;
  answered ``K`` + ``[vpid or 0, ...]`` in the same order.
* ``F`` a listener fence, ``[host, port, dbname]``; answered ``K`` + ``null`` once the
  receiver's listener for that database has read and attributed every notification committed
  before the request.

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
    "Answer",
    "Attribution",
    "Control",
    "FenceAsked",
    "ServerKey",
    "ServersAsked",
    "ServersChanged",
    "WhoHolds",
    "answered",
    "cancel_request",
    "control_request",
    "done",
    "failed",
    "fence_request",
    "read_ack",
    "read_answer",
    "read_request",
    "read_servers",
    "read_vpids",
    "servers_changed",
    "servers_request",
    "snapshot_answer",
    "snapshot_request",
    "who_holds",
]

CANCEL: Final = ord("C")
SNAPSHOT: Final = ord("S")
CONTROL: Final = ord("X")
_CHANGED: Final = ord("O")
_SERVERS: Final = ord("L")
_WHO: Final = ord("W")
_FENCE: Final = ord("F")
_DONE: Final = ord("K")
_FAILED: Final = ord("E")
_HEAD: Final = struct.Struct("!BI")
SNAPSHOT_MAX: Final = 256 << 20  # JSON bytes: ~500 bytes a client or server, so ~500k of them
_CANCEL_MIN, _CANCEL_MAX = 16, 4 + 4 + 4 + 256  # length, code, pid, key (protocol 3.2: <= 256)
_CONTROL_MAX: Final = 1024
_ERROR_MAX: Final = 64 * 1024
_PIDS_MAX: Final = 1024  # servers in one O or W message
_LIST_MAX: Final = 64 * 1024  # an O or W body, a W answer: ~30 bytes a server
_SERVERS_MAX: Final = 8 << 20  # an L answer: every server of a worker
_FENCE_MAX: Final = 1024
_REQUEST_MAX: Final = {
    CANCEL: _CANCEL_MAX,
    SNAPSHOT: 0,
    CONTROL: _CONTROL_MAX,
    _CHANGED: _LIST_MAX,
    _SERVERS: 16,
    _WHO: _LIST_MAX,
    _FENCE: _FENCE_MAX,
}
_SNAPSHOT_KEYS: Final = frozenset(Snapshot.__required_keys__)


@dataclass(frozen=True)
class Control:
    """A console control command to run on the receiving worker."""

    verb: str
    arg: str


ServerKey = tuple[str, int, int]  # a pooled server: upstream host, port, backend PID


@dataclass(frozen=True)
class ServersChanged:
    """Worker ``worker``'s ``servers`` opened (else closed)."""

    worker: int
    opened: bool
    servers: tuple[ServerKey, ...]


@dataclass(frozen=True)
class ServersAsked:
    """The request "your servers" from worker ``worker``, which just started."""

    worker: int


@dataclass(frozen=True)
class WhoHolds:
    """The question "which virtual PID holds each of these servers now" (0: none)."""

    host: str
    port: int
    pids: tuple[int, ...]


@dataclass(frozen=True)
class FenceAsked:
    """Fence the receiver's listener for one upstream database."""

    host: str
    port: int
    dbname: str


Attribution = ServersChanged | ServersAsked | WhoHolds | FenceAsked
Answer = list[ServerKey] | list[int] | None  # what an Attribution request is answered
Request = m.CancelRequest | Control | Attribution | None  # None: "your snapshot"


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


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def servers_changed(worker: int, opened: bool, servers: list[ServerKey]) -> bytes:
    return _frame(_CHANGED, _compact([worker, opened, servers]))


def servers_request(worker: int) -> bytes:
    return _frame(_SERVERS, _compact([worker]))


def who_holds(host: str, port: int, pids: list[int]) -> bytes:
    return _frame(_WHO, _compact([host, port, pids]))


def fence_request(host: str, port: int, dbname: str) -> bytes:
    return _frame(_FENCE, _compact([host, port, dbname]))


def answered(value: Answer) -> bytes:
    """The answer to an attribution request (``None``: done)."""
    return _frame(_DONE, _compact(value))


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
    if kind == _SERVERS:
        [worker] = _json(body, list, 1)
        if not _is_int(worker):
            raise m.ProtocolError("bad servers request")
        return ServersAsked(worker)
    if kind == CONTROL:
        verb, arg = _json(body, list)
        if not isinstance(verb, str) or not isinstance(arg, str):
            raise m.ProtocolError("bad control command")
        return Control(verb, arg)
    first, second, third = _json(body, list, 3)
    if kind == _CHANGED:
        if not isinstance(first, int) or not isinstance(second, bool):
            raise m.ProtocolError("bad servers message")
        return ServersChanged(first, second, _servers(third))
    if not isinstance(first, str) or not _is_int(second):
        raise m.ProtocolError("bad attribution request")
    if kind == _WHO:
        return WhoHolds(first, second, _ints(third))
    if not isinstance(third, str):
        raise m.ProtocolError("bad fence request")
    return FenceAsked(first, second, third)


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


async def read_ack(reader: asyncio.StreamReader) -> None:
    """The answer to ``servers_changed`` or ``fence_request``."""
    _, body = await _read_frame(reader, {_DONE: 4})
    if body != b"null":
        raise m.ProtocolError("bad peer acknowledgement")


async def read_servers(reader: asyncio.StreamReader) -> tuple[ServerKey, ...]:
    """The answer to ``servers_request``."""
    _, body = await _read_frame(reader, {_DONE: _SERVERS_MAX})
    return _servers(_json(body, list, None), limit=None)


async def read_vpids(reader: asyncio.StreamReader, count: int) -> tuple[int, ...]:
    """The answer to ``who_holds`` for ``count`` PIDs."""
    _, body = await _read_frame(reader, {_DONE: _LIST_MAX})
    vpids = _ints(_json(body, list, None))
    if len(vpids) != count:
        raise m.ProtocolError("bad attribution answer")
    return vpids


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def _ints(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _PIDS_MAX or not all(map(_is_int, value)):
        raise m.ProtocolError("bad PID list")
    return tuple(value)


def _servers(value: object, limit: int | None = _PIDS_MAX) -> tuple[ServerKey, ...]:
    if not isinstance(value, list) or (limit is not None and len(value) > limit):
        raise m.ProtocolError("bad server list")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not _is_int(item[1])
            or not _is_int(item[2])
        ):
            raise m.ProtocolError("bad server list")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


def _json(body: bytes, kind: type[Any], items: int | None = 2) -> Any:
    """``body`` parsed as JSON of ``kind`` (a list of exactly ``items``, None: any length)."""
    try:
        value = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise m.ProtocolError(f"bad peer message: {exc}") from None
    if not isinstance(value, kind) or (kind is list and items is not None and len(value) != items):
        raise m.ProtocolError("bad peer message")
    return value
