"""pgproxy's own Python cost per transaction, without sockets, Postgres or a second process.

Real :class:`~pgproxy.frontend.ClientSession` and :class:`~pgproxy.backend.ServerConnection`
objects are wired to in-memory transports; each transaction feeds the client a pgbench-style
request and the server its canned reply, so what is timed is exactly the proxy's work between
the two reads and the two writes a real transaction costs (the syscalls themselves are
excluded). Use it to compare hot-path changes: it is stable to a few percent, unlike a pgbench
run on a shared machine, and ``--profile`` shows where the time goes.

Run: python -m bench.hotpath [--clients 50] [--servers 20] [--protocol simple|extended|prepared]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from pgproxy.app import Proxy
from pgproxy.backend import ServerConnection
from pgproxy.config import parse_config
from pgproxy.frontend import ClientSession
from pgproxy.protocol import messages as m

SYNC = m.message(m.SYNC)
QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
# pgbench -S sends a new aid each time, so the Query text is never the same twice: the
# pre-check's cache misses, as it does under pgbench (more texts than the cache holds).
SIMPLE = [m.query(QUERY.replace("$1", str(aid))) for aid in range(20_011)]
EXTENDED = (
    m.parse("", QUERY, [23]) + m.bind("", "", [b"48213"]) + m.describe("P", "") + m.execute() + SYNC
)
PREPARED = m.bind("", "P0_1", [b"48213"]) + m.describe("P", "") + m.execute() + SYNC
ROWS = m.row_description([("abalance", 23)]) + m.data_row(["0"]) + m.command_complete("SELECT 1")
REPLY = {
    "simple": ROWS + m.ready_for_query(m.IDLE),
    "extended": m.message(m.PARSE_COMPLETE)
    + m.message(m.BIND_COMPLETE)
    + ROWS
    + m.ready_for_query(m.IDLE),
    "prepared": m.message(m.BIND_COMPLETE) + ROWS + m.ready_for_query(m.IDLE),
}


class MemoryTransport:
    """Just enough of asyncio.Transport: writes are counted, then dropped."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def abort(self) -> None: ...


async def _setup(clients: int, servers: int) -> tuple[Proxy, list[ClientSession]]:
    config = parse_config(
        {
            "proxy": {"default_pool_size": servers, "log_level": "warning"},
            "databases": {"*": {"url": "postgresql://127.0.0.1:1"}},
        }
    )
    proxy = Proxy(config)
    pool = proxy.pool_for("bench", "bench")
    pool.server_params = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}
    for pid in range(servers):
        server = ServerConnection(pool, pool.settings.max_prepared_statements)
        server.connection_made(MemoryTransport())  # type: ignore[arg-type]
        server.pid = pid + 1
        server.params = dict(pool.server_params)
        server.ready = True
        server.end_handshake()
        pool.total += 1
        pool.active.add(server)
        pool.release(server)
    sessions = []
    for n in range(clients):
        client = ClientSession(proxy)
        client.transport = MemoryTransport()  # type: ignore[assignment]
        client.user, client.database, client.pool = "bench", "bench", pool
        client.vpid, client._logged_in = n + 1, True
        client.reported = dict(pool.server_params)
        client.end_handshake()
        sessions.append(client)
    return proxy, sessions


def _prepare(sessions: list[ClientSession], protocol: str) -> None:
    """Named statements for -M prepared: each client parses P0_1 once."""
    if protocol != "prepared":
        return
    for client in sessions:
        client.stream_received(m.parse("P0_1", QUERY, [23]) + SYNC)
        server = client.server
        assert server is not None
        server.stream_received(m.message(m.PARSE_COMPLETE) + m.ready_for_query(m.IDLE))


def run(transactions: int, clients: int, servers: int, protocol: str) -> float:
    """Seconds of proxy work per transaction."""
    requests = {"simple": SIMPLE, "extended": [EXTENDED], "prepared": [PREPARED]}[protocol]
    reply = REPLY[protocol]

    async def main() -> float:
        proxy, sessions = await _setup(clients, servers)
        _prepare(sessions, protocol)
        done = 0
        started = time.perf_counter()
        while done < transactions:
            before = done
            # Every client asks; those without a server wait in the pool's queue, then get one
            # from inside a release, exactly as under pgbench with more clients than servers.
            for n, client in enumerate(sessions, done):
                client.data_received(requests[n % len(requests)])
            busy = [s for s in sessions if s.server is not None]
            while busy:
                for client in busy:
                    server = client.server
                    assert server is not None
                    server.data_received(reply)
                    done += 1
                busy = [s for s in sessions if s.server is not None and s.server.flow.pending]
            if done - before != len(sessions):
                raise RuntimeError(f"{done - before} of {len(sessions)} transactions completed")
        replies = sum(s.transport.writes for s in sessions)  # type: ignore[attr-defined]
        if replies != done + (len(sessions) if protocol == "prepared" else 0):
            raise RuntimeError(f"{done} transactions but {replies} replies reached clients")
        elapsed = time.perf_counter() - started
        await proxy.stop()
        return elapsed / done

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--protocol", default="simple,extended,prepared")
    parser.add_argument("--profile", action="store_true", help="cProfile the first protocol")
    args = parser.parse_args(argv)
    protocols = args.protocol.split(",")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.transactions // 4, args.clients, args.servers, protocols[0])
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0
    print("| protocol | clients | servers | proxy CPU per transaction |")
    print("|---|---:|---:|---:|")
    for protocol in protocols:
        per_tx = min(run(args.transactions, args.clients, args.servers, protocol) for _ in range(3))
        print(f"| {protocol} | {args.clients} | {args.servers} | {per_tx * 1e6:.1f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
