"""A relay in front of real Postgres that answers the first LISTEN with the error PostgREST
met ("could not access status of transaction"), which cannot be provoked quickly for real (it
needs a notification queue entry older than the truncated commit log). Everything else,
the LISTEN itself included, is Postgres' own work; the relay only swaps that one reply.

Speaks plaintext only (the upstream URL must say ``sslmode=disable``).
"""

from __future__ import annotations

import asyncio
import struct

from pgproxy.protocol import messages as m
from tests.support.relay import FreezableRelay

STALE_QUEUE_ERROR = m.error_response(
    {
        "S": "ERROR",
        "V": "ERROR",
        "C": "58P01",
        "M": "could not access status of transaction 1234",
        "D": 'Could not open file "pg_xact/0000": No such file or directory.',
    }
)


class ListenFaultRelay(FreezableRelay):
    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.queries: list[str] = []  # every simple Query sent upstream, in order
        self.faults = 1  # LISTEN replies still to replace

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._pipes.append((writer, up_writer))
        await asyncio.gather(self._to_server(reader, up_writer), self._to_client(up_reader, writer))

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            writer.write(struct.pack("!i", length) + await reader.readexactly(length - 4))
            while True:
                type_, body = await _message(reader)
                if type_ == m.QUERY:
                    self.queries.append(m.parse_query(body))
                writer.write(bytes([type_]) + struct.pack("!i", len(body) + 4) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def _to_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                type_, body = await _message(reader)
                data = bytes([type_]) + struct.pack("!i", len(body) + 4) + body
                if type_ == m.COMMAND_COMPLETE and body == b"LISTEN\0" and self.faults:
                    self.faults -= 1
                    data = STALE_QUEUE_ERROR
                writer.write(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(5)
    (length,) = struct.unpack_from("!i", header, 1)
    return header[0], await reader.readexactly(length - 4)
