"""Server connections for one (database, user): acquire, release, limits, waiting, reaping.

Rules that keep it honest:
* ``total`` counts every server that exists or is being connected; it never exceeds ``size``.
* A released server goes to the oldest waiter first (FIFO fairness), else onto the idle stack
  (LIFO: the most recently used server has the warmest caches).
* A server is reused only if it is idle in every sense (``ServerFlow.idle``, no internal work
  and no cancel in flight); anything else is closed, never handed out dirty.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from pgproxy.backend import ServerConnection, UpstreamTls
from pgproxy.config import DatabaseConfig, PoolMode
from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError
from pgproxy.wire import log

# Reported parameters a client cannot SET; never synchronised between sessions.
READ_ONLY_PARAMETERS = frozenset(
    (
        "in_hot_standby",
        "integer_datetimes",
        "is_superuser",
        "server_encoding",
        "server_version",
        "session_authorization",
    )
)


@dataclass(frozen=True)
class PoolSettings:
    size: int
    min_size: int
    mode: PoolMode
    connect_timeout: float
    idle_timeout: float
    lifetime: float
    reset_query: str
    max_prepared_statements: int = 200
    tls: UpstreamTls | None = None


class Pool:
    def __init__(
        self,
        name: str,
        database: DatabaseConfig,
        upstream_db: str,
        upstream_user: str,
        password: str | None,
        settings: PoolSettings,
        startup: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.database = database
        self.upstream_db = upstream_db
        self.upstream_user = upstream_user
        self.password = password
        self.settings = settings
        self.startup = dict(startup or {})  # extra startup parameters for every server
        self.idle: list[ServerConnection] = []
        self.active: set[ServerConnection] = set()
        self.waiters: deque[asyncio.Future[ServerConnection]] = deque()
        self.total = 0
        self.server_params: dict[str, str] | None = None
        self.params_lock = asyncio.Lock()  # one login learns server_params; the rest wait
        # (name, value) pairs a server accepted -> the value it reported (None if unreported).
        self.validated: dict[tuple[str, str], str | None] = {}
        self.closing = False

    @property
    def mode(self) -> PoolMode:
        return self.settings.mode

    def __repr__(self) -> str:
        return f"<pool {self.name} total={self.total} idle={len(self.idle)}>"

    # --- acquire / release -------------------------------------------------------------------

    def take_idle(self) -> ServerConnection | None:
        """An idle server at once (no waiting, no task), or None."""
        while self.idle:
            server = self.idle.pop()
            if not server.closed:
                self.active.add(server)
                return server
        return None

    def request(self, timeout: float) -> asyncio.Future[ServerConnection]:
        """A future that gets a server for exclusive use, or a PgError (connect failure, wait
        timeout). The hot path attaches a callback to it: no task, no ``wait_for``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServerConnection] = loop.create_future()
        server = self.take_idle()
        if server is not None:
            fut.set_result(server)
        elif self.closing:
            fut.set_exception(
                PgError(errors.ADMIN_SHUTDOWN, "pgproxy is shutting down", severity="FATAL")
            )
        elif self.total < self.settings.size:
            _chain(self._connect_for_use(), fut)
        else:
            self.waiters.append(fut)
            deadline = loop.call_later(timeout, self._expire, fut) if timeout > 0 else None
            fut.add_done_callback(lambda f: self._waiter_done(f, deadline))
        return fut

    async def acquire(self, timeout: float) -> ServerConnection:
        return await self.request(timeout)

    def _expire(self, fut: asyncio.Future[ServerConnection]) -> None:
        if not fut.done():
            fut.set_exception(
                PgError(
                    errors.QUERY_CANCELED,
                    "query_wait_timeout: no server connection became free in time",
                    hint=f"the pool {self.name} has {self.settings.size} connections, all in use",
                )
            )

    def _waiter_done(
        self, fut: asyncio.Future[ServerConnection], deadline: asyncio.TimerHandle | None
    ) -> None:
        # release() hands servers only to futures not yet done, so a timed-out or cancelled
        # waiter can simply be forgotten.
        if deadline is not None:
            deadline.cancel()
        if fut.cancelled() or fut.exception() is not None:
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)

    def _connect_for_use(self) -> asyncio.Future[ServerConnection]:
        """Reserve a slot now (so ``total`` never overshoots ``size``) and connect."""
        self.total += 1
        return asyncio.ensure_future(self._open_reserved())

    async def _open_reserved(self) -> ServerConnection:
        try:
            server = await self._open()
        except BaseException:
            self.total -= 1
            self._wake_waiter_to_connect()
            raise
        self.active.add(server)
        return server

    async def _open(self) -> ServerConnection:
        params = {"user": self.upstream_user, "database": self.upstream_db, **self.startup}
        try:
            server = await asyncio.wait_for(
                ServerConnection.open(
                    self,
                    self.database.host,
                    self.database.port,
                    params,
                    self.password,
                    self.settings.tls,
                ),
                self.settings.connect_timeout or None,
            )
        except TimeoutError:
            raise PgError(
                errors.CONNECTION_FAILURE,
                f"could not connect to upstream server {self.database.host}:"
                f"{self.database.port}: timeout after {self.settings.connect_timeout:g}s",
            ) from None
        if self.server_params is None:
            self.server_params = dict(server.params)
        log.debug("%r: opened %r", self, server)
        return server

    def _wake_waiter_to_connect(self) -> None:
        """A slot freed up without a server to hand over: let the oldest waiter connect."""
        while self.waiters and self.total < self.settings.size:
            fut = self.waiters.popleft()
            if fut.done():
                continue
            task = self._connect_for_use()
            _chain(task, fut)
            return

    def release(self, server: ServerConnection) -> None:
        """Take a server back from a client. It must owe nothing to anyone."""
        server.unlink()
        if server.closed:
            self.discard(server)
            return
        # Still counted as active here, so that closing it gives its slot back.
        if (
            not server.flow.idle
            or server.cancels_in_flight
            or (self.settings.lifetime and server.age() > self.settings.lifetime)
        ):
            self.close_server(server)
            return
        if server.needs_unlisten:
            # Queued ahead of the next client's messages; its replies are swallowed in order.
            server.needs_unlisten = False
            server.send_internal("UNLISTEN *")
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(server)  # stays active: handed straight to the waiter
                return
        if self.closing:
            self.close_server(server)
        else:
            self.active.discard(server)
            self.idle.append(server)

    def discard(self, server: ServerConnection) -> None:
        """Forget a server that is closed or about to be (idempotent)."""
        removed = False
        if server in self.active:
            self.active.discard(server)
            removed = True
        if server in self.idle:
            self.idle.remove(server)
            removed = True
        if removed:
            self.total -= 1
            self._wake_waiter_to_connect()

    def close_server(self, server: ServerConnection) -> None:
        """Take a server out of use for good: no client, no pool slot, socket closed."""
        server.unlink()
        self.discard(server)
        server.close()

    # --- maintenance -------------------------------------------------------------------------

    def reap(self, now: float) -> None:
        """Close servers idle too long or past their lifetime, keeping ``min_size`` open."""
        keep = self.settings.min_size
        for server in list(self.idle):
            too_old = self.settings.lifetime and server.age(now) > self.settings.lifetime
            too_idle = (
                self.settings.idle_timeout
                and now - server.idle_since > self.settings.idle_timeout
                and self.total > keep
            )
            if too_old or too_idle:
                self.close_server(server)

    async def warm_up(self) -> None:
        """Open servers until ``min_size`` exist (best effort)."""
        while self.total < self.settings.min_size and not self.closing:
            self.total += 1
            try:
                server = await self._open()
            except PgError as exc:
                self.total -= 1
                log.warning("%r: warm-up failed: %s", self, exc.message)
                return
            self.release(server)

    def same_route(self, other: Pool) -> bool:
        """Would this pool connect the same way as ``other`` (so a reload can keep it)?"""
        return (
            self.database == other.database
            and self.upstream_db == other.upstream_db
            and self.upstream_user == other.upstream_user
            and self.password == other.password
            and self.settings == other.settings
        )

    def retire(self) -> None:
        """Stop pooling: idle servers close now, busy ones when released (after waiters)."""
        self.closing = True
        for server in list(self.idle):
            self.close_server(server)

    async def close(self) -> None:
        self.retire()
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(
                    PgError(errors.ADMIN_SHUTDOWN, "pgproxy is shutting down", severity="FATAL")
                )
        self.waiters.clear()
        for server in list(self.active):
            self.close_server(server)

    def stats(self) -> dict[str, int]:
        return {
            "total": self.total,
            "idle": len(self.idle),
            "active": len(self.active),
            "waiting": len(self.waiters),
        }


def _chain(task: asyncio.Future[ServerConnection], fut: asyncio.Future[ServerConnection]) -> None:
    """Deliver a connect task's outcome to a waiter; if the waiter gave up, release the server."""

    def done(t: asyncio.Future[ServerConnection]) -> None:
        if t.cancelled():
            if not fut.done():
                fut.cancel()
            return
        exc = t.exception()
        if fut.done():
            if exc is None:
                t.result().pool.release(t.result())
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(t.result())

    task.add_done_callback(done)
