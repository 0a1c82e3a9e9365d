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
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pgproxy.auth.credentials import UpstreamSecret
from pgproxy.backend import ServerConnection, ServerHome
from pgproxy.config import DatabaseConfig, PoolMode
from pgproxy.pool.stats import PoolStats
from pgproxy.pool.targets import Upstream, address_text, open_suited, param_check
from pgproxy.pool.waiters import Deliver, ServerRequest, chain, wake
from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError
from pgproxy.server_open import UpstreamTls
from pgproxy.wire import log


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
    target_session_attrs: str = ""  # "": the database's (the listener asks for "primary")


class Pool(ServerHome):
    """The servers of one route; the ServerHome (backend.py) of each of them."""

    def __init__(
        self,
        name: str,
        database: DatabaseConfig,
        upstream_db: str,
        upstream_user: str,
        password: str | None,
        settings: PoolSettings,
        startup: Mapping[str, str] | None = None,
        pass_through: Callable[[], UpstreamSecret | None] | None = None,
    ) -> None:
        self.name = name
        self.database = database
        self.upstream_db = upstream_db
        self.upstream_user = upstream_user
        self.password = password
        # Without a password: credentials learnt from the user's logins (SCRAM pass-through).
        self.pass_through = pass_through
        self.settings = settings
        self.mode: PoolMode = settings.mode  # read on every message: an attribute, not a property
        self.startup = dict(startup or {})  # extra startup parameters for every server
        # The role its servers must have (pool/targets.py), and whether one still has it by
        # what it reported last (None: any will do): checked as servers come free.
        self.target = settings.target_session_attrs or database.target_session_attrs
        self.suits = param_check(self.target)
        self.idle: list[ServerConnection] = []
        self.active: set[ServerConnection] = set()
        self.waiters: deque[ServerRequest] = deque()
        self._loop = asyncio.get_running_loop()
        self._expiry: asyncio.TimerHandle | None = None  # fails waiters past their deadline
        self._expiry_at = math.inf
        self.total = 0
        self.server_params: dict[str, str] | None = None
        self.params_lock = asyncio.Lock()  # one login learns server_params; the rest wait
        # (name, value) pairs a server accepted -> the value it reported (None if unreported).
        self.validated: dict[tuple[str, str], str | None] = {}
        self.closing = False
        # PAUSE: no server is handed out or opened; idle and released ones wait in ``parked``.
        self.paused = False
        self._paused_at = 0.0
        self.parked: list[ServerConnection] = []
        self._quiet: list[asyncio.Future[None]] = []  # pause() callers: until none is in use
        # RECONNECT: servers to close instead of reusing (and WAIT_CLOSE callers).
        self.stale: set[ServerConnection] = set()
        self._closed_stale: list[asyncio.Future[None]] = []
        self.stats = PoolStats()  # traffic since this pool was made (SHOW STATS, /metrics)
        # Failed connect attempts, and the last one's error: logins waiting to learn the
        # server's parameters share the fate of the attempt they waited for (client/login.py).
        self.connect_failures = 0
        self.last_connect_error: PgError | None = None
        self.logged_states: set[str] = set()  # kinds of untracked session state, logged once
        self.last_login = 0.0  # when a server last logged in (monotonic; 0: never): /readyz
        # With workers (pgproxy.pubsub.siblings): told of each server (awaited before its use).
        self.server_opened: Callable[[ServerConnection], Awaitable[None]] | None = None
        self.server_closed: Callable[[ServerConnection], None] | None = None

    def __repr__(self) -> str:
        return f"<pool {self.name} total={self.total} idle={len(self.idle)}>"

    # --- acquire / release -------------------------------------------------------------------

    def take_idle(self) -> ServerConnection | None:
        """An idle server at once (no waiting, no task), or None."""
        while self.idle:
            server = self.idle.pop()
            if server.closed:
                continue
            self.active.add(server)
            if self.suits is None or self.suits(server.params):
                return server
            self.close_for(server, "role changed")
        return None

    def request(self, deliver: Deliver, timeout: float) -> ServerRequest:
        """Ask for a server for exclusive use; ``deliver(server, None)`` or ``deliver(None,
        error)`` (connect failure, wait timeout) is called exactly once unless the request is
        cancelled. A server freed by ``release`` is delivered synchronously, from inside the
        release: no Future, no task, no loop round trip on the hot path. Other outcomes are
        delivered from a fresh loop callback, never from inside this call."""
        loop = self._loop
        now = loop.time()
        req = ServerRequest(deliver, now + timeout if timeout > 0 else math.inf, now)
        server = self.take_idle() if self.idle else None
        if server is not None:
            loop.call_soon(req.set_result, server)
        elif self.closing:
            error = PgError(errors.ADMIN_SHUTDOWN, "pgproxy is shutting down", severity="FATAL")
            loop.call_soon(req.set_exception, error)
        elif self.total < self.settings.size and not self.paused:
            chain(self._connect_for_use(), req)
        else:
            self.waiters.append(req)
            if req.deadline < self._expiry_at and not self.paused:
                self._schedule_expiry(req.deadline)
        return req

    async def acquire(self, timeout: float) -> ServerConnection:
        fut: asyncio.Future[ServerConnection] = self._loop.create_future()

        def deliver(server: ServerConnection | None, error: BaseException | None) -> None:
            if fut.done():  # the awaiting task was cancelled
                if server is not None:
                    self.release(server)
            elif server is not None:
                fut.set_result(server)
            else:
                fut.set_exception(error or RuntimeError("no server"))

        req = self.request(deliver, timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            req.cancel()
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed over (a release delivers synchronously) before the cancel reached
                # this task, which never resumed to take it: it goes back, or stays in use.
                self.release(fut.result())
            raise

    def _schedule_expiry(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = self._loop.call_at(when, self._expire_waiters)

    def _expire_waiters(self) -> None:
        """One timer per pool, not one per wait: fail every waiter past its deadline, then
        sleep until the next deadline."""
        self._expiry, self._expiry_at = None, math.inf
        if self.paused:
            return  # nothing fails while paused: resume() starts the clocks again
        now = self._loop.time()
        expired = [w for w in self.waiters if not w.done and w.deadline <= now]
        self.waiters = deque(w for w in self.waiters if not w.done and w.deadline > now)
        if self.waiters:
            next_deadline = min(w.deadline for w in self.waiters)
            if next_deadline < math.inf:
                self._schedule_expiry(next_deadline)
        for waiter in expired:
            waiter.set_exception(
                PgError(
                    errors.QUERY_CANCELED,
                    "query_wait_timeout: no server connection became free in time",
                    hint=f"the pool {self.name} has {self.settings.size} connections, all in use",
                )
            )

    def _connect_for_use(self) -> asyncio.Future[ServerConnection]:
        """Reserve a slot now (so ``total`` never overshoots ``size``) and connect."""
        self.total += 1
        return asyncio.ensure_future(self._open_reserved())

    async def _open_reserved(self) -> ServerConnection:
        try:
            server = await self._open()
        except BaseException as exc:
            self.total -= 1
            if isinstance(exc, PgError):
                self.connect_failures += 1
                self.last_connect_error = exc
            self._wake_waiter_to_connect()
            raise
        self.active.add(server)
        return server

    async def _open(self) -> ServerConnection:
        params = {"user": self.upstream_user, "database": self.upstream_db, **self.startup}
        settings = self.settings
        upstream = Upstream(
            self,
            self.database,
            self.target,
            params,
            self.credentials(),
            settings.tls,
            settings.max_prepared_statements,
            settings.connect_timeout,
        )
        try:
            server = await open_suited(upstream)
        except PgError as exc:
            fields = {"event": "server_connect_failed", "reason": exc.message, **self._log_fields()}
            log.warning("%r: connecting a server failed: %s", self, exc.message, extra=fields)
            raise
        self.last_login = time.monotonic()
        if self.server_params is None:
            self.server_params = dict(server.params)
        log.info(
            "%r: opened %r",
            self,
            server,
            extra={"event": "server_opened", "pid": server.pid, **self._log_fields(server)},
        )
        if self.server_opened is not None:
            try:
                await self.server_opened(server)
            except BaseException:
                server.close()
                raise
        return server

    def _log_fields(self, server: ServerConnection | None = None) -> dict[str, object]:
        host, port = server.address if server is not None else self.database.hosts[0]
        return {
            "pool": self.name,
            "database": self.upstream_db,
            "user": self.upstream_user,
            "upstream": address_text(host, port),
        }

    def credentials(self) -> UpstreamSecret | None:
        if self.password is None and self.pass_through is not None:
            return self.pass_through()
        return self.password

    def _wake_waiter_to_connect(self) -> None:
        """A slot freed up without a server to hand over: let the oldest waiter connect."""
        while self.waiters and self.total < self.settings.size and not self.paused:
            req = self.waiters.popleft()
            if req.done:
                continue
            chain(self._connect_for_use(), req)
            return

    def release(self, server: ServerConnection) -> None:
        """Take a server back from a client. It must owe nothing to anyone."""
        server.unlink()
        linked_at = server.linked_at
        if linked_at:
            # The end of a client's use of it: one server assignment for the statistics,
            # inline and in as few writes as the common case allows (one query, one
            # transaction, no idle time in it): this runs once per transaction. Times in
            # transaction mode only: in session mode the link lasts the whole session.
            server.linked_at = 0.0
            stats = self.stats
            stats.server_assignment_count += 1
            flow = server.flow
            if flow.done != 1:
                stats.more_queries += flow.done - 1
            if flow.xacts != 1:
                stats.more_xacts += flow.xacts - 1
            if self.mode == "transaction":
                stats.xact_seconds += server.idle_since - linked_at
                if server.idle_in_tx:
                    stats.idle_in_transaction_seconds += server.idle_in_tx
                    server.idle_in_tx = 0.0
        if server.closed:
            self.discard(server)
            return
        # Still counted as active here, so that closing it gives its slot back.
        if self.suits is not None and not self.suits(server.params):
            self.close_for(server, "role changed")  # promoted or made read-only under it
            return
        lifetime = self.settings.lifetime
        if (
            not server.flow.idle
            or server.cancels_in_flight
            or (lifetime and server.idle_since - server.created_at > lifetime)  # unlink: now
            or (self.stale and server in self.stale)  # RECONNECT
        ):
            why = "cancel in flight" if server.cancels_in_flight else "lifetime"
            self.close_for(server, why if server.flow.idle else "not idle when released")
            return
        if server.needs_unlisten:
            # Queued ahead of the next client's messages; its replies are swallowed in order.
            server.needs_unlisten = False
            server.send_internal("UNLISTEN *")
        if self.paused:
            self.active.discard(server)
            self.parked.append(server)
            self._check_quiet()
            return
        while self.waiters:
            req = self.waiters.popleft()
            if not req.done:
                req.set_result(server)  # stays active: handed straight to the waiter
                return
        if self.closing:
            self.close_for(server, "pool closing")
        else:
            self.active.discard(server)
            self.idle.append(server)

    def discard(self, server: ServerConnection) -> None:
        """Forget a server that is closed or about to be (idempotent)."""
        self._forget(server, "connection lost")

    def _forget(self, server: ServerConnection, reason: str) -> None:
        removed = False
        if server in self.active:
            self.active.discard(server)
            removed = True
        if server in self.idle:
            self.idle.remove(server)
            removed = True
        if server in self.parked:
            self.parked.remove(server)
            removed = True
        if removed:
            fields = {"event": "server_closed", "pid": server.pid, "reason": reason}
            fields |= self._log_fields(server)
            log.info("%r: closed %r: %s", self, server, reason, extra=fields)
            if self.server_closed is not None:
                self.server_closed(server)
            self.total -= 1
            self._wake_waiter_to_connect()
        if self.stale:
            self.stale.discard(server)
            if not self.stale:
                wake(self._closed_stale)
        elif self.closing and not self.total:
            wake(self._closed_stale)
        if self.paused:
            self._check_quiet()

    def close_server(self, server: ServerConnection) -> None:
        """Take a server out of use for good: no client, no pool slot, socket closed."""
        self.close_for(server, "closed by pgproxy")

    def close_for(self, server: ServerConnection, reason: str) -> None:
        """``close_server``, with the reason its log line gives."""
        server.unlink()
        self._forget(server, reason)
        server.close()

    # --- operator commands: PAUSE, RESUME, RECONNECT, WAIT_CLOSE ------------------------------

    async def pause(self) -> None:
        """Hand out and open no server until :meth:`resume`; returns once none is in use (the
        transactions in flight have ended). Waiting clients wait, with their clocks stopped."""
        self.hold()
        if self.active:
            quiet = self._loop.create_future()
            self._quiet.append(quiet)
            await quiet

    def hold(self) -> None:
        """The synchronous part of :meth:`pause`: from now on nothing is handed out."""
        if not self.paused:
            self.paused = True
            self._paused_at = self._loop.time()
            self.parked += self.idle
            self.idle.clear()

    def _check_quiet(self) -> None:
        if not self.active:
            wake(self._quiet)

    def resume(self) -> None:
        """Serve again: parked servers go to the waiters (oldest first), then idle."""
        if not self.paused:
            return
        self.paused = False
        wake(self._quiet)  # a PAUSE still waiting is overtaken
        stopped = self._loop.time() - self._paused_at
        for req in self.waiters:
            req.deadline += stopped
        parked, self.parked = self.parked, []
        for server in parked:
            self.active.add(server)
            self.release(server)  # to the oldest waiter, else idle
        self._wake_waiter_to_connect()
        if self.waiters:
            self._schedule_expiry(min(w.deadline for w in self.waiters))

    def reconnect(self) -> None:
        """Replace every server as it comes free: idle ones close now, busy ones at release."""
        self.stale.update(self.active)
        for server in [*self.idle, *self.parked]:
            self.close_server(server)

    async def wait_close(self) -> None:
        """Until the servers a RECONNECT (or a reload retiring this pool) replaces are gone."""
        if self.stale or (self.closing and self.total):
            done = self._loop.create_future()
            self._closed_stale.append(done)
            await done

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
                self.close_for(server, "lifetime" if too_old else "idle timeout")

    async def warm_up(self) -> None:
        """Open servers until ``min_size`` exist (best effort; a pass-through pool waits until
        a client has logged in and so provided the credentials)."""
        if self.pass_through is not None and self.credentials() is None:
            return
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
            self.close_for(server, "pool closing")

    async def close(self) -> None:
        self.retire()
        waiters, self.waiters = self.waiters, deque()
        for req in waiters:
            req.set_exception(
                PgError(errors.ADMIN_SHUTDOWN, "pgproxy is shutting down", severity="FATAL")
            )
        if self._expiry is not None:
            self._expiry.cancel()
        for server in list(self.active):
            self.close_for(server, "pool closing")

    def counts(self) -> dict[str, int]:
        """How many servers there are, by state, and clients waiting (now)."""
        return {
            "total": self.total,
            "idle": len(self.idle),
            "active": len(self.active),
            "waiting": sum(1 for w in self.waiters if not w.done),
        }


def pool_of(server: ServerConnection) -> Pool:
    """The pool ``server`` belongs to, as a Pool (``server.pool`` is the ServerHome it needs)."""
    pool = server.pool
    if not isinstance(pool, Pool):
        raise TypeError(f"{server!r} belongs to {pool!r}, not a Pool")
    return pool
