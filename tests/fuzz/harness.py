"""One client session of a real proxy, driven with bytes in memory, and the fuzzers' properties.

A :class:`Rig` is a proxy (``pgproxy.testing.memory``) with one pool, ``bench``/``bench``, of
servers answered by :class:`~tests.fuzz.fakepg.FakePostgres`; a client connects (its login
task runs, from the startup packet on), is fed chunks of bytes, then goes away. Afterwards
:meth:`Rig.check` asserts the properties every fuzzer shares:

* no exception escapes: nothing raised out of ``data_received``, nothing reached the event
  loop's exception handler, nothing logged with a traceback (an "internal error");
* what the proxy sent the client is well-formed backend messages (after the one-byte answers
  to SSL/GSS requests), and a session the proxy ended with an error got a FATAL
  ErrorResponse;
* a defined end: the session's ``mode`` is one of ``stream.MODE_NAMES`` throughout and CLOSED
  once the connection is lost, and its login task is finished;
* no server taken or stuck: every server is idle in the pool again (or closed and forgotten),
  no waiter is left, ``pool.total`` agrees;
* bounded allocation (``measure=True``): tracemalloc's peak while the input is read is within
  a constant plus a small multiple of the bytes actually sent, whatever lengths they declare.

Rule: a property failure is an AssertionError naming the property; everything else the proxy
does is its own business.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from collections.abc import Iterable
from typing import Any

from pgproxy.app import Proxy
from pgproxy.auth import scram
from pgproxy.client import stream
from pgproxy.client.session import ClientSession
from pgproxy.config import parse_config
from pgproxy.pool.pool import Pool
from pgproxy.protocol import messages as m
from pgproxy.testing.memory import SERVER_PARAMS, MemoryTransport, add_server
from tests.fuzz.fakepg import FakePostgres

USER = DATABASE = "bench"
PASSWORD = "fuzz-secret"
# Derived once (4096 PBKDF2 rounds) with a fixed salt: a stored verifier needs no thread.
VERIFIER = scram.ScramVerifier.from_password(PASSWORD, salt=b"fuzz-salt-16byte")
SERVERS = 2
# The proxy may hold this much for one session beyond what it was sent (its own objects,
# the greeting, error texts); anything proportional to a declared length would exceed it.
MEMORY_SLACK = 512 * 1024
MEMORY_FACTOR = 4


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.tracebacks.append(self.format(record))


def config(auth_type: str = "trust", pool_mode: str = "transaction") -> dict[str, Any]:
    return {
        "proxy": {
            "default_pool_size": SERVERS,
            "log_level": "warning",
            "auth_type": auth_type,
            "pool_mode": pool_mode,
            "admin_users": [USER],
            "max_prepared_statements": 4,
        },
        "databases": {DATABASE: {"url": "postgresql://127.0.0.1:1"}},
        "users": {USER: {"password": str(VERIFIER)}},
    }


class Rig:
    """A proxy with one pool of fake servers, and one client session at a time."""

    def __init__(self, auth_type: str = "trust", pool_mode: str = "transaction") -> None:
        self.proxy = Proxy(parse_config(config(auth_type, pool_mode)))
        self.pool: Pool = self.proxy.pool_for(DATABASE, USER)
        self.pool.server_params = dict(SERVER_PARAMS)
        self.fakes = [FakePostgres(add_server(self.pool, pid + 1, keep=True)) for pid in range(2)]
        self.loop_errors: list[dict[str, Any]] = []
        self.logged = _Captured()
        self.raised: list[BaseException] = []
        self.client: ClientSession | None = None
        self.sent = bytearray()
        self.bytes_in = 0
        self.peak = 0

    # --- driving ----------------------------------------------------------------------------

    async def __aenter__(self) -> Rig:
        asyncio.get_running_loop().set_exception_handler(
            lambda _, ctx: self.loop_errors.append(ctx)
        )
        logging.getLogger("pgproxy").addHandler(self.logged)
        return self

    async def __aexit__(self, *exc: object) -> None:
        logging.getLogger("pgproxy").removeHandler(self.logged)
        asyncio.get_running_loop().set_exception_handler(None)

    def connect(self) -> ClientSession:
        client = ClientSession(self.proxy)
        client.connection_made(MemoryTransport(keep=True))  # type: ignore[arg-type]
        self.client = client
        return client

    @property
    def transport(self) -> MemoryTransport:
        assert self.client is not None
        transport = self.client.transport
        assert isinstance(transport, MemoryTransport)
        return transport

    async def settle(self, rounds: int = 200) -> None:
        """Run the loop and the fake servers until nothing moves (a few quiet turns)."""
        quiet = 0
        for _ in range(rounds):
            await asyncio.sleep(0)
            moved = False
            for fake in self.fakes:
                moved = fake.pump() or moved
            if self.client is not None:
                self.sent += self.transport.take()
                self._check_mode()
            quiet = 0 if moved else quiet + 1
            if quiet >= 4:
                return

    async def feed(self, chunks: Iterable[bytes], measure: bool = False) -> None:
        """Send ``chunks`` one read at a time (as a paused socket would: not while paused)."""
        client = self.client or self.connect()
        if measure:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        try:
            for chunk in chunks:
                if client.closed:
                    break
                if client.read_paused:
                    await self.settle()
                    if client.read_paused:
                        break  # a real socket would deliver nothing more: the client waits
                self.bytes_in += len(chunk)
                try:
                    client.data_received(chunk)
                except Exception as exc:  # escaped: what asyncio would log as a fatal error
                    self.raised.append(exc)
                    break
                await self.settle()
        finally:
            if measure:
                self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - base)
                tracemalloc.stop()

    async def hang_up(self) -> None:
        """The client goes (or, if the proxy closed it, asyncio reports the loss)."""
        client = self.client
        assert client is not None
        await self.settle()
        client.connection_lost(None)
        await self.settle()
        # A server the proxy closes for good is lost to the pool once its socket is gone.
        for fake in self.fakes:
            fake.pump()

    # --- the properties ---------------------------------------------------------------------

    def _check_mode(self) -> None:
        assert self.client is not None
        mode = self.client.mode
        assert mode in range(len(stream.MODE_NAMES)), f"undefined mode {mode!r}"

    def check(self) -> None:
        client = self.client
        assert client is not None
        assert not self.raised, f"exception escaped data_received: {self.raised[0]!r}"
        assert not self.loop_errors, f"exception reached the event loop: {self.loop_errors[0]}"
        assert not self.logged.tracebacks, f"internal error logged:\n{self.logged.tracebacks[0]}"
        assert client.mode == stream.CLOSED, f"ended in {stream.MODE_NAMES[client.mode]}"
        task = client._task
        assert task is None or task.done(), "login task still running after the client left"
        messages = backend_messages(bytes(self.sent))
        fatal = [f for t, f in messages if t == m.ERROR_RESPONSE and f.get("S") == "FATAL"]
        if fatal:
            assert self.transport.closed, f"FATAL {fatal[0]} but the connection stayed open"
        if messages and messages[-1][0] == m.TLS_REFUSAL_ALERT[0]:
            assert self.transport.closed, "TLS alert but the connection stayed open"
        pool = self.pool
        assert not pool.active, f"servers left taken: {pool.active}"
        assert not [w for w in pool.waiters if not w.done], "a request for a server left waiting"
        assert pool.total == len(pool.idle), f"total {pool.total} != idle {len(pool.idle)}"
        for server in pool.idle:
            assert server.flow.idle and not server.closed, f"idle server not clean: {server!r}"
        for fake in self.fakes:
            if not fake.gone:  # a live server has read whole messages only
                assert not fake.pending, f"server left holding part of a message: {fake.pending!r}"
        bound = MEMORY_SLACK + MEMORY_FACTOR * self.bytes_in
        assert self.peak <= bound, f"allocated {self.peak} B for {self.bytes_in} B of input"


def backend_messages(data: bytes) -> list[tuple[int, dict[str, str]]]:
    """The proxy's output as (type, error fields or {}); asserts it is well framed."""
    pos = 0
    while pos < len(data) and data[pos] in b"NS" and (len(data) - pos < 5 or _odd(data, pos)):
        pos += 1  # the answers to SSLRequest/GSSENCRequest
    out: list[tuple[int, dict[str, str]]] = []
    if data.startswith(m.TLS_REFUSAL_ALERT, pos):  # a direct-TLS ClientHello where none is offered
        assert pos + len(m.TLS_REFUSAL_ALERT) == len(data), f"bytes after the TLS alert: {data!r}"
        return [(data[pos], {})]
    while pos < len(data):
        assert len(data) - pos >= 5, f"truncated message at {pos}: {data[pos:]!r}"
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        assert length >= 4 and pos + 1 + length <= len(data), f"bad frame at {pos}: {data[pos:]!r}"
        body = data[pos + 5 : pos + 1 + length]
        fields = m.parse_error_fields(body) if data[pos] in (m.ERROR_RESPONSE,) else {}
        out.append((data[pos], fields))
        pos += 1 + length
    return out


def _odd(data: bytes, pos: int) -> bool:
    """At ``pos`` a single N/S byte, not the start of a NoticeResponse (N) message."""
    length = int.from_bytes(data[pos + 1 : pos + 5], "big")
    return not (length >= 4 and pos + 1 + length <= len(data))


async def run_session(
    chunks: Iterable[bytes], auth_type: str = "trust", measure: bool = False
) -> Rig:
    """One whole session from raw bytes, with its properties checked."""
    async with Rig(auth_type) as rig:
        await rig.feed(chunks, measure)
        await rig.hang_up()
        rig.check()
    return rig
