"""A TCP relay in front of Postgres whose connections can be silently frozen: the way a NAT or
load balancer that dropped its state looks to both ends (no FIN, no RST, nothing arrives)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class FreezableRelay:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._pipes: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._frozen: set[int] = set()  # ids of frozen pipes
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FreezableRelay:
        self._thread.start()
        self._call(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for a, b in self._pipes:
            a.transport.abort()
            b.transport.abort()

    @property
    def connections(self) -> int:
        return int(self._call(lambda: len(self._pipes)))

    def freeze_all(self) -> None:
        """Stop moving bytes on every connection open now, without closing anything."""
        self._call(lambda: self._frozen.update(range(len(self._pipes))))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        index = len(self._pipes)
        self._pipes.append((writer, up_writer))
        await asyncio.gather(
            self._pump(index, reader, up_writer), self._pump(index, up_reader, writer)
        )

    async def _pump(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                if index in self._frozen:
                    continue  # swallowed: the other side hears nothing, ever
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if index not in self._frozen:
                writer.close()
