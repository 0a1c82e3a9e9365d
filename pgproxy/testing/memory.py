"""A proxy whose clients and servers talk over in-memory transports: no sockets, no Postgres.

Real :class:`~pgproxy.client.session.ClientSession` and
:class:`~pgproxy.backend.ServerConnection` objects, logged in and linked exactly as in
production, fed bytes by the caller; what they write is recorded (or only counted, for the
hot-path benchmark). Used by ``bench.hotpath`` and by tests that drive the client's state
machine with bytes alone.
"""

from __future__ import annotations

from typing import Any

from pgproxy.app import Proxy
from pgproxy.backend import ServerConnection
from pgproxy.client.session import ClientSession
from pgproxy.client.settings import ClientSettings
from pgproxy.config import parse_config
from pgproxy.pool.pool import Pool

SERVER_PARAMS = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}


class MemoryTransport:
    """Just enough of asyncio.Transport: writes are counted and, if ``keep``, recorded."""

    def __init__(self, keep: bool = False) -> None:
        self.writes = 0
        self.keep = keep
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        if self.keep:
            self.written += data

    def take(self) -> bytes:
        out = bytes(self.written)
        self.written.clear()
        return out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def memory_proxy(servers: int, proxy_options: dict[str, Any] | None = None) -> tuple[Proxy, Pool]:
    """A proxy (call from a running event loop) with one pool of ``servers`` idle servers."""
    config = parse_config(
        {
            "proxy": {
                "default_pool_size": servers,
                "log_level": "warning",
                **(proxy_options or {}),
            },
            "databases": {"*": {"url": "postgresql://127.0.0.1:1"}},
        }
    )
    proxy = Proxy(config)
    pool = proxy.pool_for("bench", "bench")
    pool.server_params = dict(SERVER_PARAMS)
    for pid in range(servers):
        add_server(pool, pid + 1)
    return proxy, pool


def add_server(pool: Pool, pid: int, keep: bool = False) -> ServerConnection:
    """A logged-in server, idle in ``pool``."""
    server = ServerConnection(pool, pool.settings.max_prepared_statements)
    server.connection_made(MemoryTransport(keep))  # type: ignore[arg-type]
    server.pid = pid
    server.params = dict(SERVER_PARAMS)
    server.ready = True
    server.end_handshake()
    pool.total += 1
    pool.active.add(server)
    pool.release(server)
    return server


async def memory_client(proxy: Proxy, pool: Pool, keep: bool = False) -> ClientSession:
    """A client logged in to ``pool`` as the login hand-off leaves it (greeting discarded)."""
    client = ClientSession(proxy)
    transport = MemoryTransport(keep)
    client.connection_made(transport)  # type: ignore[arg-type]
    task = client._task
    if task is not None:  # no startup packet will come: the login is done by hand below
        task.cancel()
        client._task = None
    client.user = client.database = "bench"
    await client._hand_off(pool, ClientSettings(dict(SERVER_PARAMS), {}), None)
    transport.take()
    transport.writes = 0
    return client
