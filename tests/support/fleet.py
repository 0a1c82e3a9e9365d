"""Hundreds of LISTENing clients in one asyncio loop, each checked against one shared stream.

Every listener LISTENs on the same channels before anything is published, so every listener
must receive the very same bytes: the NotificationResponses the proxy's one upstream listener
read, in its order. The first listener to receive a message appends it to the
:class:`NotificationLog`, which parses it once and checks each publisher's sequence (payload
``"<publisher>:<seq>:<epoch seconds sent>"``: 0, 1, 2, ... with no gap and no repeat); every
other listener compares its bytes with the log's (a memcmp per chunk, not a parse per
message). So 1,000 listeners cost little more than one parse of the stream, and a listener that
got anything else (a gap, a repeat, a reordering, a stray message) is caught at the byte where
it diverged. A listener may end only with an error (an ErrorResponse or its connection
reset/closed), recorded with how much of the stream it had: never a silent gap.

Raw protocol (trust login), via :mod:`pgproxy.protocol.messages`; ``SO_RCVBUF`` and reading
pace are per listener, so the same class plays a slow consumer.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pgproxy.protocol import messages as m

_HEADER = struct.Struct("!cI")


class NotificationLog:
    """The stream every listener must get: whole NotificationResponses, checked once each."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ends: list[int] = []  # offset just past each message
        self.sent_at: list[float] = []  # its publisher's clock_timestamp(), epoch seconds
        self.next_seq: dict[str, int] = {}  # publisher -> the sequence number expected next
        self.problems: list[str] = []

    def append(self, message: bytes) -> None:
        note = m.parse_notification(message[5:])
        publisher, seq, sent = note.payload.split(":")[:3]  # then padding, if any
        expected = self.next_seq.get(publisher, 0)
        if int(seq) != expected:
            self.problems.append(f"publisher {publisher}: got {seq} where {expected} was due")
        self.next_seq[publisher] = int(seq) + 1
        self.data += message
        self.ends.append(len(self.data))
        self.sent_at.append(float(sent))

    def count_before(self, offset: int) -> int:
        """How many whole messages lie before ``offset``."""
        return bisect.bisect_right(self.ends, offset)


@dataclass
class Fleet:
    """Shared by the listeners of one run: the log, and the worst lag seen by any of them."""

    log: NotificationLog = field(default_factory=NotificationLog)
    max_lag: float = 0.0  # seconds from a notification's commit to a fast listener having it


class Listener(asyncio.Protocol):
    """One LISTENing client: logs in, LISTENs, then checks what it receives against the log."""

    def __init__(self, fleet: Fleet, channels: Sequence[str], slow: float = 0.0) -> None:
        self.fleet = fleet
        self.channels = channels
        self.slow = slow  # 0: read as fast as possible; > 0: one read per this many seconds
        self.stuck = False  # never reads again once listening (pause_reading only)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._login_buf = b""
        self._readies = 0
        self.listening = False
        self.offset = 0  # bytes of the log this listener has received, verified
        self._tail = b""  # received past the log's end, not yet a whole message
        self.ended: str | None = None  # why it stopped: an error, never silence
        self.wrong: str | None = None  # what it got that it should not have

    # --- login and LISTEN --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(m.startup_message({"user": "postgres", "database": "postgres"}))

    def data_received(self, data: bytes) -> None:
        if self.listening:
            self._stream(data)
            return
        self._login_buf += data
        while len(self._login_buf) >= 5 and not self.listening:
            kind, length = _HEADER.unpack_from(self._login_buf)
            if len(self._login_buf) < 1 + length:
                return
            body, self._login_buf = self._login_buf[5 : 1 + length], self._login_buf[1 + length :]
            if kind == b"E":
                self._end(f"error before listening: {m.parse_error_fields(body)}")
            elif kind == b"Z":
                self._readies += 1
                if self._readies == 1:
                    listen = "; ".join(f"LISTEN {c}" for c in self.channels)
                    self.transport.write(m.query(listen))  # type: ignore[union-attr]
                else:
                    self._start_listening()
        if self.listening and self._login_buf:
            rest, self._login_buf = self._login_buf, b""
            self._stream(rest)

    def _start_listening(self) -> None:
        self.listening = True
        if not self.ready.done():
            self.ready.set_result(None)
        if self.stuck:
            self.transport.pause_reading()  # type: ignore[union-attr]
        elif self.slow:
            self._pace()

    def _pace(self) -> None:
        """Read one chunk (at most SO_RCVBUF) per ``slow`` seconds."""
        assert self.transport is not None
        if self.ended is None:
            self.transport.resume_reading()
            asyncio.get_running_loop().call_later(self.slow, self._pace)

    # --- the stream --------------------------------------------------------------------------

    def _stream(self, data: bytes) -> None:
        if self.slow and self.transport is not None:
            self.transport.pause_reading()  # until the next _pace
        if self.ended is not None:
            return
        log = self.fleet.log
        before = self.offset
        buf = self._tail + data if self._tail else data
        known = min(len(buf), len(log.data) - self.offset)
        if known > 0:
            if log.data[self.offset : self.offset + known] != buf[:known]:
                self._diverged(buf)
                return
            self.offset += known
            buf = buf[known:]
        while len(buf) >= 5:  # past the log's end: whole messages, appended by this listener
            kind, length = _HEADER.unpack_from(buf)
            if len(buf) < 1 + length:
                break
            message, buf = buf[: 1 + length], buf[1 + length :]
            if kind != b"A":
                self._other(kind, message)
                return
            log.append(message)
            self.offset += len(message)
        self._tail = buf
        oldest_new = log.count_before(before)  # the longest-travelled message it now has
        fast = not (self.slow or self.stuck)
        if fast and oldest_new < log.count_before(self.offset):
            lag = time.time() - log.sent_at[oldest_new]
            self.fleet.max_lag = max(self.fleet.max_lag, lag)

    def _diverged(self, buf: bytes) -> None:
        """Its bytes differ from the log's: fine only if it is told why it is cut off there."""
        log = self.fleet.log
        at = self.offset
        while at < len(log.data):  # the first whole message that differs
            end = log.ends[log.count_before(at)]
            if log.data[at:end] != buf[at - self.offset : end - self.offset]:
                break
            at = end
        rest = buf[at - self.offset :]
        self.offset = at
        if at not in log.ends and at != 0:
            self.wrong = f"diverged inside a message at byte {at}"
            self._end("diverged")
        elif len(rest) < 5 or len(rest) < 1 + _HEADER.unpack_from(rest)[1]:
            self._tail = rest  # the rest of it comes with the next read
        else:
            self._other(rest[:1], rest)

    def _other(self, kind: bytes, message: bytes) -> None:
        if kind == b"E":
            (length,) = struct.unpack_from("!I", message, 1)
            self._end(f"ErrorResponse {m.parse_error_fields(message[5 : 1 + length])}")
        else:
            self.wrong = f"unexpected {kind!r} after {self.notifications} notifications"
            self._end("unexpected message")

    @property
    def notifications(self) -> int:
        return self.fleet.log.count_before(self.offset)

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        if not self.ready.done():
            self.ready.set_exception(AssertionError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc!r}" if exc else "connection closed by the proxy")
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_listener(
    fleet: Fleet,
    port: int,
    channels: Sequence[str],
    *,
    rcvbuf: int = 0,
    slow: float = 0.0,
    stuck: bool = False,
) -> Listener:
    """A listener LISTENing (acknowledged) through the proxy on 127.0.0.1:``port``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before the handshake
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    listener = Listener(fleet, channels, slow)
    listener.stuck = stuck
    await loop.create_connection(lambda: listener, sock=sock)
    await asyncio.wait_for(listener.ready, 60)
    return listener


async def open_fleet(
    fleet: Fleet, port: int, channels: Sequence[str], count: int, at_once: int = 50
) -> list[Listener]:
    """``count`` fast listeners, ``at_once`` logging in at a time."""
    gate = asyncio.Semaphore(at_once)

    async def one() -> Listener:
        async with gate:
            return await open_listener(fleet, port, channels)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def publish_sql(publisher: int, channel: str, first: int, count: int, pad: int = 0) -> str:
    """One statement sending ``count`` notifications of ``publisher`` from ``first`` on, in
    order, in the statement's transaction (they fire at its commit); ``pad`` bytes more each."""
    padding = f" || ':' || repeat('x', {pad})" if pad else ""
    return (
        f"select pg_notify('{channel}', '{publisher}:' || g || ':' ||"
        f" extract(epoch from clock_timestamp())::text{padding})"
        f" from generate_series({first}, {first + count - 1}) g"
    )
