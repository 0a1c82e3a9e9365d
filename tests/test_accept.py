"""pgproxy's own accept path (``pgproxy.accept``): bounded batches, and no spin when accept()
fails for want of file descriptors. Real sockets on 127.0.0.1 and uvloop, no proxy around it
(the proxy's use of it is what every other test connects through)."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from pgproxy.accept import ACCEPT_BATCH, TcpListener, bind_tcp


class _CountingSocket(socket.socket):
    """A listening socket that counts its accepts, and fails the first ``fail`` of them."""

    accepted = 0
    fail = 0
    failed_at: tuple[float, ...] = ()

    def accept(self) -> tuple[socket.socket, Any]:
        if self.fail:
            self.fail -= 1
            self.failed_at = (*self.failed_at, time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")
        conn, address = super().accept()
        self.accepted += 1
        return conn, address


def _listening() -> _CountingSocket:
    [plain] = bind_tcp("127.0.0.1", 0, reuse_port=False)
    sock = _CountingSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
    sock.setblocking(False)
    return sock


def _listener(
    sock: socket.socket, made: list[asyncio.BaseTransport], changed: asyncio.Event
) -> TcpListener:
    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)
            changed.set()

    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return TcpListener([sock], Recorder, lambda: None, lambda: 5.0, spawn)


async def _until(condition: Callable[[], bool], changed: asyncio.Event) -> None:
    async with asyncio.timeout(20):
        while not condition():
            changed.clear()
            await changed.wait()


def test_a_connection_storm_is_accepted_in_bounded_batches() -> None:
    """However many connections wait, one loop turn accepts at most ACCEPT_BATCH of them."""
    count = ACCEPT_BATCH * 3 + 5

    async def main() -> list[int]:
        sock = _listening()
        clients = [socket.create_connection(sock.getsockname()) for _ in range(count)]
        made: list[asyncio.BaseTransport] = []
        per_turn: list[int] = []
        loop = asyncio.get_running_loop()

        def each_turn(last: int = 0) -> None:
            per_turn.append(sock.accepted - last)
            if sock.accepted < count:
                loop.call_soon(each_turn, sock.accepted)

        changed = asyncio.Event()
        listener = _listener(sock, made, changed)
        loop.call_soon(each_turn)
        await _until(lambda: len(made) == count, changed)
        listener.close()
        for client in clients:
            client.close()
        for transport in made:
            transport.close()
        return per_turn

    per_turn = uvloop.run(main())
    assert sum(per_turn) == count
    assert max(per_turn) == ACCEPT_BATCH, per_turn  # full batches, never more


def test_accept_out_of_file_descriptors_pauses_then_serves() -> None:
    """EMFILE: the listener logs, waits instead of being woken for the same error, then
    accepts the client that was waiting."""

    async def main() -> tuple[tuple[float, ...], float, int]:
        sock = _listening()
        sock.fail = 1
        made: list[asyncio.BaseTransport] = []
        changed = asyncio.Event()
        listener = _listener(sock, made, changed)
        with socket.create_connection(sock.getsockname()):
            await _until(lambda: len(made) == 1, changed)
            served_at = time.monotonic()
        listener.close()
        made[0].close()
        return sock.failed_at, served_at, sock.fileno()

    failed_at, served_at, fileno = uvloop.run(main())
    assert len(failed_at) == 1  # no retry storm on the same error
    assert served_at - failed_at[0] >= 0.9  # the pause (a loaded machine only makes it longer)
    assert fileno == -1  # close() closed the listening socket
