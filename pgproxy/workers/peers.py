"""The workers' private channel: each worker's unix socket, and asking the others over theirs.

Each worker listens on a unix socket in a private (0700) directory the supervisor made
(``WorkerRole.peer_dir``) and answers its siblings' requests (``peerwire`` builds and parses
them): a CancelRequest for one of its clients (a client's virtual backend PID encodes the
index of its worker, ``pgproxy.app.vpid_owner``, so a worker that receives a cancel for
another's client forwards the raw request), "your snapshot" (the admin console and /metrics
show the whole proxy), a console control command to run (PAUSE, RESUME, KILL, ...), and what
attributing notifications across workers needs (``pgproxy.pubsub.siblings``: servers opened
and closed, "who holds this server now", listener fences).

Rules: this module carries requests and answers; it never judges them. Only the owner knows a
client's secret, and its :class:`PeerHost` compares it in constant time, as for a local
cancel; merging snapshots and combining the outcomes of a command are the asker's
(``pgproxy.admin.whole``). Every exchange is one request on its own connection with a timeout
of its own: a worker that does not answer in time (stopped, busy, gone) costs its asker that
timeout and nothing more, and is reported, never waited for forever (a command that waits,
PAUSE, waits as long as the worker does: it is the worker's answer that is awaited). It knows
a worker by its ``WorkerRole`` alone, not the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Sequence
from typing import Protocol, TypeVar

from pgproxy.admin.snapshot import Snapshot
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.workers import peerwire
from pgproxy.workers.role import WorkerRole

__all__ = ["PEER_TIMEOUT", "PeerHost", "Peers"]

log = logging.getLogger("pgproxy")

PEER_TIMEOUT = 5.0  # to connect, send a request, or read one
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class PeerHost(Protocol):
    """What a worker does for its siblings (``pgproxy.app.Proxy`` provides it)."""

    def cancel_here(self, request: m.CancelRequest) -> None:
        """Cancel what the client named runs, if the secret matches (else nothing)."""
        ...

    def snapshot(self) -> Snapshot: ...

    def perform(self, verb: str, arg: str) -> Awaitable[str]:
        """Run a console control command in this process: its tag, or the PgError."""
        ...

    def attribution(self, request: peerwire.Attribution) -> Awaitable[peerwire.Answer]:
        """Answer a NOTIFY attribution request (``pgproxy.pubsub.siblings``)."""
        ...


class Peers:
    """A worker's end of the channel: its own socket, and requests to the others'."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self.index = role.index
        self.count = role.count
        self._server: asyncio.AbstractServer | None = None
        self._answering: set[asyncio.Task[object]] = set()  # requests being answered

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    def _path(self, index: int) -> str:
        return str(self.role.peer_dir / f"worker-{index}.sock")

    # --- answering ----------------------------------------------------------------------------

    async def start(self, host: PeerHost) -> None:
        """Answer the other workers' requests from ``host``."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._answering.add(task)
            try:
                await _answer(host, reader, writer)
            finally:
                self._answering.discard(task)
                writer.close()

        path = self._path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's predecessor
        self._server = await asyncio.start_unix_server(serve, path)

    async def close(self) -> None:
        for task in list(self._answering):
            task.cancel()  # a forwarded PAUSE may wait for ever: the process is stopping
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- asking -------------------------------------------------------------------------------

    async def forward(self, owner: int, request: m.CancelRequest) -> None:
        """Pass a CancelRequest to worker ``owner``, which checks the secret and acts on it."""
        try:
            await self._exchange(
                owner, peerwire.cancel_request(request), _until_closed, PEER_TIMEOUT
            )
        except (OSError, TimeoutError, m.ProtocolError) as exc:
            log.warning("cancel request for worker %d not forwarded: %s", owner, exc)

    async def snapshots(self, timeout: float) -> dict[int, Snapshot | Exception]:
        """Every other worker's snapshot, asked at once; what went wrong instead for a worker
        that did not answer within ``timeout`` seconds."""
        request = peerwire.snapshot_request()

        async def read(reader: asyncio.StreamReader) -> Snapshot:
            answer = await peerwire.read_answer(reader, peerwire.SNAPSHOT)
            assert not isinstance(answer, str)
            return answer

        return await self._everyone(request, read, timeout)

    async def perform(
        self, verb: str, arg: str, timeout: float | None
    ) -> dict[int, str | Exception]:
        """Run a console control command on every other worker at once: each one's tag, or
        what it failed with (a PgError, or why it did not answer; ``timeout``: seconds to
        wait for an answer, None: as long as the worker is there)."""
        request = peerwire.control_request(verb, arg)

        async def read(reader: asyncio.StreamReader) -> str:
            return str(await peerwire.read_answer(reader, peerwire.CONTROL))

        return await self._everyone(request, read, timeout)

    # --- NOTIFY attribution (pgproxy.pubsub.siblings) ------------------------------------------

    async def servers_changed(
        self, opened: bool, servers: list[peerwire.ServerKey], timeout: float
    ) -> dict[int, Exception | None]:
        """Tell every other worker that these servers of this one opened (else closed)."""
        request = peerwire.servers_changed(self.index, opened, servers)
        return await self._everyone(request, peerwire.read_ack, timeout)

    async def servers(self, timeout: float) -> dict[int, Sequence[peerwire.ServerKey] | Exception]:
        """Every other worker's servers."""
        request = peerwire.servers_request(self.index)
        return await self._everyone(request, peerwire.read_servers, timeout)

    async def who_holds(
        self, owner: int, host: str, port: int, pids: list[int], timeout: float
    ) -> tuple[int, ...]:
        """The virtual PID holding each of worker ``owner``'s servers ``pids`` (0: none)."""

        async def read(reader: asyncio.StreamReader) -> tuple[int, ...]:
            return await peerwire.read_vpids(reader, len(pids))

        return await self._exchange(owner, peerwire.who_holds(host, port, pids), read, timeout)

    async def fence(
        self, host: str, port: int, dbname: str, timeout: float
    ) -> dict[int, Exception | None]:
        """Every other worker's listener fence for one upstream database."""
        request = peerwire.fence_request(host, port, dbname)
        return await self._everyone(request, peerwire.read_ack, timeout)

    async def _everyone(
        self,
        request: bytes,
        read: _Reader[T],
        timeout: float | None,
    ) -> dict[int, T | Exception]:
        others = self.others
        answers = await asyncio.gather(
            *(self._exchange(i, request, read, timeout) for i in others), return_exceptions=True
        )
        out: dict[int, T | Exception] = {}
        for index, answer in zip(others, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancelled: the asker is going away
            if isinstance(answer, TimeoutError):
                answer = TimeoutError("no answer in time")
            out[index] = answer
        return out

    async def _exchange(
        self, index: int, request: bytes, read: _Reader[T], timeout: float | None
    ) -> T:
        """One request to worker ``index`` on a connection of its own, and its answer, all
        within ``timeout`` seconds (None: no limit but PEER_TIMEOUT to connect and send)."""
        async with asyncio.timeout(timeout):
            async with asyncio.timeout(PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self._path(index))
            try:
                writer.write(request)
                async with asyncio.timeout(PEER_TIMEOUT):
                    await writer.drain()
                return await read(reader)
            finally:
                writer.close()


class _Reader(Protocol[T_co]):
    def __call__(self, reader: asyncio.StreamReader, /) -> Awaitable[T_co]: ...


async def _until_closed(reader: asyncio.StreamReader) -> None:
    await reader.read()  # the owner of a cancelled client closes once it has acted


async def _answer(
    host: PeerHost, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Read one request from a sibling and answer it."""
    try:
        async with asyncio.timeout(PEER_TIMEOUT):
            request = await peerwire.read_request(reader)
    except (OSError, TimeoutError, m.ProtocolError) as exc:
        log.warning("bad request from another worker: %s", exc)
        return
    if isinstance(request, m.CancelRequest):
        host.cancel_here(request)
        return
    if request is None:
        answer = peerwire.snapshot_answer(host.snapshot())
    elif not isinstance(request, peerwire.Control):
        try:
            async with asyncio.timeout(PEER_TIMEOUT):  # the asker waits no longer either
                answer = peerwire.answered(await host.attribution(request))
        except TimeoutError:
            log.warning("%s from another worker not answered in time", type(request).__name__)
            return
    else:
        try:
            answer = peerwire.done(await host.perform(request.verb, request.arg))
        except PgError as exc:
            answer = peerwire.failed(exc)
        except Exception as exc:
            log.exception("%s from another worker failed", request.verb.upper())
            answer = peerwire.failed(PgError(errors.INTERNAL_ERROR, f"internal error: {exc}"))
    try:
        writer.write(answer)
        async with asyncio.timeout(PEER_TIMEOUT):
            await writer.drain()
    except (OSError, TimeoutError) as exc:  # the asker gave up waiting
        log.debug("answer to another worker not delivered: %s", exc)
