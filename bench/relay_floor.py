"""The least a Python transaction pooler can do: the floor under pgproxy in bench.throughput.

A uvloop relay that pools upstream connections in transaction mode and does nothing else:
no authentication (it greets every client itself with the first server's ParameterStatus),
no parameter tracking, no prepared statements, no LISTEN, no cancel, no error handling
beyond closing. It walks message headers on both sides (counting the client's Query/Sync
messages and the server's ReadyForQuery) because releasing a server needs exactly that, and
forwards every read with one write. Whatever tps this gets against PgBouncer on a machine
is the ceiling for any pooler built on Python and uvloop there; pgproxy's distance from it is
what its own features cost.

    python -m bench.relay_floor --listen 127.0.0.1:6499 --upstream 127.0.0.1:5432 \\
        --user postgres --database postgres --pool-size 20

Not a product: bench.throughput starts it as the target ``floor`` (``--floor``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal

import uvloop

from pgproxy.protocol import messages as m

_Q, _S, _Z, _X = ord("Q"), ord("S"), ord("Z"), ord("X")


class Walker:
    """Message boundaries in a byte stream split at arbitrary points; counts messages of
    the types asked for, and remembers the status byte of the last ReadyForQuery."""

    __slots__ = ("counts", "head", "last_status", "left", "type_")

    def __init__(self) -> None:
        self.head = b""  # a partial 5-byte header carried to the next read
        self.left = 0  # bytes of the current message body still to come
        self.type_ = 0
        self.counts = 0
        self.last_status = 0

    def feed(self, data: bytes, counted: tuple[int, ...]) -> None:
        if self.head:
            data = self.head + data
            self.head = b""
        pos, n = 0, len(data)
        if self.left:
            step = min(self.left, n)
            if self.type_ == _Z and step == self.left:
                self.last_status = data[step - 1]
            self.left -= step
            pos = step
        while pos < n:
            if n - pos < 5:
                self.head = data[pos:]
                return
            type_ = data[pos]
            body = int.from_bytes(data[pos + 1 : pos + 5]) - 4
            self.type_ = type_
            if type_ in counted:
                self.counts += 1
            end = pos + 5 + body
            if end > n:
                self.left = end - n
                return
            if type_ == _Z:
                self.last_status = data[end - 1]
            pos = end


class Relay:
    def __init__(self, params: bytes) -> None:
        self.params = params  # ParameterStatus messages sent to every client
        self.idle: list[Server] = []
        self.waiting: collections.deque[Client] = collections.deque()

    def acquire(self, client: Client) -> None:
        if self.idle:
            client.link(self.idle.pop())
        else:
            self.waiting.append(client)

    def release(self, server: Server) -> None:
        while self.waiting:
            client = self.waiting.popleft()
            if not client.closed:
                client.link(server)
                return
        self.idle.append(server)


class Server(asyncio.Protocol):
    def __init__(self, relay: Relay | None = None) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.walker = Walker()
        self.startup = bytearray()
        self.ready: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():  # startup: collect until the first ReadyForQuery
            self.startup += data
            if self.startup.endswith(m.ready_for_query()):
                self.ready.set_result(bytes(self.startup))
            return
        client = self.client
        if client is None:
            return
        self.walker.feed(data, (_Z,))
        client.transport.write(data)
        if self.walker.counts >= client.walker.counts and self.walker.last_status == m.IDLE:
            client.server = self.client = None
            self.walker.counts = client.walker.counts = 0
            assert self.relay is not None
            self.relay.release(self)


class Client(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: Server | None = None
        self.walker = Walker()
        self.started = False
        self.pending = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.pending += data
            if len(self.pending) < 8 or len(self.pending) < int.from_bytes(self.pending[:4]):
                return
            length = int.from_bytes(self.pending[:4])
            code = int.from_bytes(self.pending[4:8])
            rest = bytes(self.pending[length:])
            self.pending.clear()
            if code == m.SSL_REQUEST_CODE or code == m.GSSENC_REQUEST_CODE:
                self.transport.write(b"N")
                if rest:
                    self.data_received(rest)
                return
            self.started = True
            self.transport.write(
                m.authentication_ok()
                + self.relay.params
                + m.backend_key_data(1, b"\0\0\0\0")
                + m.ready_for_query()
            )
            if not rest:
                return
            data = rest
        if data[0] == _X:
            self.transport.close()
            return
        self.walker.feed(data, (_Q, _S))
        if self.server is not None:
            assert self.server.transport is not None
            self.server.transport.write(data)
            return
        self.pending += data
        if len(self.pending) == len(data):
            self.relay.acquire(self)

    def link(self, server: Server) -> None:
        self.server = server
        server.client = self
        data = bytes(self.pending)
        self.pending.clear()
        assert server.transport is not None
        server.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    up_host, up_port = args.upstream.rsplit(":", 1)
    startup = m.startup_message({"user": args.user, "database": args.database})
    servers = []
    for _ in range(args.pool_size):
        _, server = await loop.create_connection(Server, up_host, int(up_port))
        assert server.transport is not None
        server.transport.write(startup)
        servers.append(server)
    replies = [await s.ready for s in servers]
    # The first server's ParameterStatus messages, for every client's greeting.
    params, pos, first = [], 0, replies[0]
    while pos < len(first):
        end = pos + 1 + int.from_bytes(first[pos + 1 : pos + 5])
        if first[pos] == m.PARAMETER_STATUS:
            params.append(first[pos:end])
        pos = end
    relay = Relay(b"".join(params))
    for s in servers:
        s.relay = relay
        relay.idle.append(s)
    host, port = args.listen.rsplit(":", 1)
    await loop.create_server(lambda: Client(relay), host, int(port))
    build = "compiled" if __file__.endswith(".so") else "pure Python"
    print(f"relay_floor ready ({build})", flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.relay_floor",
        description="A bare uvloop transaction pooler: the floor under pgproxy.",
    )
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--user", default="postgres")
    p.add_argument("--database", default="postgres")
    p.add_argument("--pool-size", type=int, default=20)
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
