"""Transport glue shared by client and server connections.

A connection lives in two modes. During its handshake (startup, authentication) the code is
sequential, so bytes are buffered and read with ``await read_message()``. Once the session is
established the connection switches to streaming: every chunk goes straight to
``stream_received`` without a task switch, which is where the hot path lives (PgBouncer's sbuf
idea: look at headers, forward runs of bytes).

Flow control ties two connections together: when one side's write buffer is full
(``pause_writing``), the peer feeding it stops reading until it drains.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import Final, cast

from pgproxy.pacing import LoginPacer
from pgproxy.protocol import messages as m
from pgproxy.protocol.framing import read_length

log = logging.getLogger("pgproxy")

_I32: Final = struct.Struct("!i")
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# Bytes a peer may send ahead during its handshake before we stop reading it.
_HANDSHAKE_BUFFER_LIMIT: Final = 256 * 1024


class WireProtocol(asyncio.Protocol):
    """Buffering, handshake reads, closing and write flow control."""

    # Slots, here and in the subclasses: the hot path reads these attributes on every message,
    # and CPython 3.11 only specialises attribute access well for slots or small dicts.
    __slots__ = (
        "_handshaking",
        "_held",
        "_hs_buf",
        "_pacer",
        "_waiter",
        "closed",
        "read_paused",
        "tls",
        "transport",
        "write_paused",
    )

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._hs_buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._handshaking = True
        self.closed = False
        self.write_paused = False
        self.read_paused = False
        self._held: list[bytes] | None = None  # output held back, in order (hold_output)
        self.tls = False
        # Set for a client's login: each handshake read waits for its turn (pgproxy.pacing).
        self._pacer: LoginPacer | None = None

    # --- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._handshaking:
            self._hs_buf += data
            if len(self._hs_buf) > _HANDSHAKE_BUFFER_LIMIT:
                self.pause_reading()  # resumed when the handshake wants more
            self._wake()
        else:
            self.stream_received(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.feeder()
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.feeder()
        if peer is not None:
            peer.resume_reading()

    # --- to be provided by subclasses ------------------------------------------------------

    def stream_received(self, data: bytes) -> None:
        raise NotImplementedError

    def on_lost(self, exc: Exception | None) -> None:
        pass

    def feeder(self) -> WireProtocol | None:
        """The connection whose bytes are written into this one (paused when we are full)."""
        return None

    # --- reading and writing ---------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        elif not self.closed:
            self.transport.write(data)

    def hold_output(self) -> None:
        """Keep everything written from now on until ``release_output`` (order preserved)."""
        if self._held is None:
            self._held = []

    def release_output(self) -> None:
        held, self._held = self._held, None
        if held and not self.closed:
            self.transport.write(b"".join(held))

    def close(self) -> None:
        self.release_output()  # a final error must not stay held
        if not self.closed:
            self.closed = True
            self.transport.close()
            self._wake()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()
            self._wake()

    def reset(self) -> None:
        """Abort with a TCP reset: unsent bytes are dropped by the kernel too.

        For a peer that stopped reading, a plain close would leave its backlog in the
        kernel's send buffer, trickling out for as long as the peer keeps a window open.
        """
        sock = self.transport.get_extra_info("socket")
        if sock is not None and not self.closed:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.abort()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _fill(self, size: int) -> None:
        """Wait until the handshake buffer holds ``size`` bytes."""
        while len(self._hs_buf) < size:
            if self.closed:
                raise ConnectionError("connection closed")
            self.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def start_tls(
        self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """Upgrade this connection in place; later reads and writes are encrypted."""
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport, self, ctx, server_side=server_side, server_hostname=server_hostname
        )
        if transport is None:
            raise ConnectionError("connection closed during the TLS handshake")
        self.transport = transport
        self.tls = True

    async def read_byte(self) -> bytes:
        """One byte of the handshake (the server's answer to an SSLRequest)."""
        await self._fill(1)
        b = bytes(self._hs_buf[:1])
        del self._hs_buf[:1]
        return b

    async def peek_byte(self) -> int:
        """The next byte of the handshake, left to be read."""
        await self._fill(1)
        return self._hs_buf[0]

    async def read_startup_packet(self, max_length: int) -> bytes:
        """A length-prefixed startup-phase packet (no type byte); returns its body."""
        await self._fill(4)
        (length,) = _I32.unpack_from(self._hs_buf, 0)
        if length < 8 or length > max_length:
            raise m.ProtocolError("invalid length of startup packet")
        await self._fill(length)
        body = bytes(self._hs_buf[4:length])
        del self._hs_buf[:length]
        if self._pacer is not None:
            await self._pacer.step()
        return body

    async def read_message(self, max_length: int) -> tuple[int, bytes]:
        """One regular message (type, body) during the handshake."""
        await self._fill(5)
        type_ = self._hs_buf[0]
        length = read_length(self._hs_buf, 1)
        if length < 4 or length > max_length:
            raise m.ProtocolError(f"invalid message length {length}")
        await self._fill(length + 1)
        body = bytes(self._hs_buf[5 : length + 1])
        del self._hs_buf[: length + 1]
        if self._pacer is not None:
            await self._pacer.step()
        return type_, body

    def has_buffered_input(self) -> bool:
        return bool(self._hs_buf)

    def end_handshake(self) -> None:
        """Switch to streaming; bytes that arrived early are streamed now."""
        self._handshaking = False
        self.resume_reading()
        if self._hs_buf:
            data = bytes(self._hs_buf)
            self._hs_buf.clear()
            self.stream_received(data)
