"""Cancels between workers: each worker's private unix socket, and forwarding to the others'.

A CancelRequest lands on whichever worker the kernel picks. A client's virtual backend PID
encodes the index of the worker that owns it (``pgproxy.app.vpid_owner``); a worker that
receives a cancel for another worker's client forwards the raw request over a unix socket in a
private (0700) directory the supervisor made (``WorkerRole.peer_dir``).

Rule: this module only carries requests; it never judges them. Only the owner knows the
secret, and its ``deliver`` callback (the app's cancel routing) compares it in constant time,
as for a local cancel; the forwarding worker learns nothing and answers nothing (Postgres
answers nothing either). It knows a worker by its ``WorkerRole`` alone, not the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable

from pgproxy.protocol import messages as m
from pgproxy.workers.role import WorkerRole

__all__ = ["CancelPeers"]

log = logging.getLogger("pgproxy")

_PEER_TIMEOUT = 5.0
_CANCEL_MAX = 4 + 4 + 4 + 256  # length, code, pid, key of up to 256 bytes (protocol 3.2)


class CancelPeers:
    """A worker's end of the cancel channel: its own unix socket, and forwarding to others'."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self.index = role.index
        self.count = role.count
        self._server: asyncio.AbstractServer | None = None

    def _path(self, index: int) -> str:
        return str(self.role.peer_dir / f"worker-{index}.sock")

    async def start(self, deliver: Callable[[m.CancelRequest], None]) -> None:
        """Accept forwarded CancelRequests and hand each to ``deliver`` (the owner's check)."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(_PEER_TIMEOUT):
                    (length,) = struct.unpack("!I", await reader.readexactly(4))
                    if not 16 <= length <= _CANCEL_MAX:
                        raise m.ProtocolError("bad length")
                    packet = m.parse_startup_packet(await reader.readexactly(length - 4))
                if isinstance(packet, m.CancelRequest):
                    deliver(packet)
            except (OSError, EOFError, TimeoutError, m.ProtocolError) as exc:
                log.warning("bad forwarded cancel request: %s", exc)
            finally:
                writer.close()

        path = self._path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's predecessor
        self._server = await asyncio.start_unix_server(serve, path)

    async def forward(self, owner: int, request: m.CancelRequest) -> None:
        """Pass ``request`` to worker ``owner``, which checks the secret and acts on it."""
        try:
            async with asyncio.timeout(_PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self._path(owner))
                try:
                    writer.write(m.cancel_request(request.pid, request.secret))
                    await writer.drain()
                    await reader.read()  # the owner closes once it has acted
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("cancel request for worker %d not forwarded: %s", owner, exc)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
