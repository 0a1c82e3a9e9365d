"""What an operator can do to a running pgproxy: drain, pause, resume, reconnect, kill, disable.

Owns the operations behind PgBouncer's control commands and signals (the console and
``serve.py`` call them; the config's ``paused`` is applied through them) and the state they
leave: which databases are paused, disabled, and whether the process is draining.

* **Drain** (SIGTERM, ``SHUTDOWN``): the proxy stops accepting (its listening sockets close, so
  with ``so_reuseport`` a successor takes new connections; the unix socket stays for the admin
  console) and each client is closed with FATAL 57P01 as soon as it is between transactions:
  idle clients and listeners at once, busy ones when their transaction or pipeline ends.
  After ``shutdown_timeout`` the rest get a cancel, then the close.
* **Pause** waits for the transactions in flight, then holds new ones (clients wait, nothing
  fails, their ``query_wait_timeout`` clocks stopped) until **resume**.

Rule: every operation goes through the pools' and sessions' own methods
(``Pool.pause``/``resume``/``reconnect``, ``ClientSession.close_at_boundary``); nothing here
reaches into a connection's streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError
from pgproxy.wire import log

if TYPE_CHECKING:
    from pgproxy.backend import ServerConnection
    from pgproxy.client.session import ClientSession
    from pgproxy.config import Config
    from pgproxy.pool.pool import Pool

SHUTTING_DOWN = "pgproxy is shutting down"
KILLED = "terminating connection due to administrator command"


class Controlled(Protocol):
    """The parts of ``pgproxy.app.Proxy`` the operations act on."""

    config: Config
    pools: dict[tuple[str, str], Pool]

    @property
    def sessions(self) -> Iterable[ClientSession]: ...
    def stop_accepting(self) -> None: ...
    def cancel_server(self, server: ServerConnection) -> None: ...


class Control:
    def __init__(self, proxy: Controlled) -> None:
        self._proxy = proxy
        self.draining = False
        self.paused_all = False  # PAUSE without a database, SIGUSR1, or ``paused = true``
        self.paused: set[str] = set()  # databases paused one by one
        self.disabled: set[str] = set()  # databases refusing new clients (DISABLE)
        self._paused_by_config = False
        self._sessions_changed = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        # How the process stops (``serve.py`` sets it; a proxy run by tests does not stop).
        self.request_stop: Callable[[], None] = lambda: None
        # In a worker, how the console's SHUTDOWN stops every worker (``serve.py``: a signal
        # to the supervisor, which passes it on); None: this process is the whole proxy.
        self.stop_workers: Callable[[bool], None] | None = None

    # --- shutdown ----------------------------------------------------------------------------

    def shutdown(self, drain: bool) -> None:
        """SIGTERM, SIGINT, ``SHUTDOWN WAIT_FOR_CLIENTS|WAIT_FOR_SERVERS``: drain, then stop.
        SIGQUIT, ``SHUTDOWN``, or a second request while draining: stop now."""
        if drain and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_stop())
        else:
            log.info("stopping now")
            self.request_stop()

    def shutdown_all(self, drain: bool) -> None:
        """The console's SHUTDOWN [WAIT_FOR_*]: the whole proxy stops, every worker."""
        if self.stop_workers is not None:
            self.stop_workers(drain)
        else:
            self.shutdown(drain)

    async def _drain_then_stop(self) -> None:
        cut = await self.drain(self._proxy.config.proxy.shutdown_timeout)
        log.info("drained%s", f" ({cut} cut at the timeout)" if cut else "")
        self.request_stop()

    def stop_draining(self) -> None:
        """The process stops: a drain still running is over."""
        if self._drain_task is not None:
            self._drain_task.cancel()

    def knows(self, database: str) -> bool:
        """A database the config names, or one a client has used (through ``"*"``)."""
        proxy = self._proxy
        return database in proxy.config.databases or any(db == database for db, _ in proxy.pools)

    # --- pause / resume ----------------------------------------------------------------------

    def is_paused(self, database: str) -> bool:
        """Whether a pool made now for ``database`` starts paused."""
        return self.paused_all or database in self.paused

    async def pause(self, database: str | None = None) -> None:
        """PAUSE [db]: returns once no server of those pools is in use."""
        if database is None:
            self.paused_all = True
        else:
            self.paused.add(database)
        log.info("pausing %s", database or "all databases")
        await asyncio.gather(*(pool.pause() for _, pool in self._pools(database)))
        log.info("paused %s", database or "all databases")

    def resume(self, database: str | None = None) -> None:
        """RESUME [db] (also while draining)."""
        if database is None:
            self.paused_all = False
            self.paused.clear()
        else:
            self.paused.discard(database)
        for db, pool in self._pools(database):
            if not self.is_paused(db):
                pool.resume()
        log.info("resumed %s", database or "all databases")

    def apply_config(self, config: Config) -> None:
        """The declarative ``paused`` setting, at start and at each reload: it pauses or
        resumes everything, but never undoes a PAUSE an operator gave by command."""
        wanted = config.proxy.paused
        if wanted and not self.paused_all:
            self._paused_by_config = True
            asyncio.get_running_loop().create_task(self.pause())
        elif not wanted and self._paused_by_config:
            self._paused_by_config = False
            self.resume()

    # --- servers and clients -----------------------------------------------------------------

    def reconnect(self, database: str | None = None) -> None:
        """RECONNECT [db]: every server is replaced as it comes free."""
        for _, pool in self._pools(database):
            pool.reconnect()

    async def wait_close(self, database: str | None = None) -> None:
        """WAIT_CLOSE [db]: until the servers RECONNECT or a reload replaces are closed."""
        await asyncio.gather(*(pool.wait_close() for _, pool in self._pools(database)))

    def kill(self, database: str | None = None) -> int:
        """KILL [db]: close its clients and servers now; new clients wait until RESUME."""
        if database is None:
            self.paused_all = True
        else:
            self.paused.add(database)
        count = 0
        error = PgError(errors.ADMIN_SHUTDOWN, KILLED, severity="FATAL")
        for session in list(self._proxy.sessions):
            if session.pool is not None and (database is None or session.database == database):
                session.fail(error)
                count += 1
        for _, pool in self._pools(database):
            pool.hold()
            pool.reconnect()
        return count

    def kill_client(self, vpid: int) -> bool:
        """KILL_CLIENT id: close one client (its id is its virtual PID)."""
        for session in self._proxy.sessions:
            if session.vpid == vpid:
                session.fail(PgError(errors.ADMIN_SHUTDOWN, KILLED, severity="FATAL"))
                return True
        return False

    def disable(self, database: str) -> None:
        """DISABLE db: new clients of it are refused; its current ones carry on."""
        self.disabled.add(database)

    def enable(self, database: str) -> None:
        self.disabled.discard(database)

    def login_refusal(self, database: str) -> PgError | None:
        """Why a client may not log in now (draining, or its database disabled), if so."""
        if self.draining:
            return PgError(errors.CANNOT_CONNECT_NOW, SHUTTING_DOWN, severity="FATAL")
        if database in self.disabled:
            return PgError(
                errors.CANNOT_CONNECT_NOW,
                f'database "{database}" is disabled',
                severity="FATAL",
                hint="an operator ran DISABLE; ENABLE lets clients in again",
            )
        return None

    # --- drain -------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> int:
        """Close every client at its next transaction boundary; after ``timeout`` seconds
        cancel and close the rest. Returns how many had to be cut."""
        if not self.draining:
            self.draining = True
            self._proxy.stop_accepting()
            log.info("draining: each client is closed at its next transaction boundary")
        bye = PgError(errors.ADMIN_SHUTDOWN, SHUTTING_DOWN, severity="FATAL")
        for session in list(self._proxy.sessions):
            session.close_at_boundary(bye)
        deadline = time.monotonic() + timeout
        while self._remaining():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._sessions_changed.clear()
            try:
                await asyncio.wait_for(self._sessions_changed.wait(), left)
            except TimeoutError:
                break
        cut = self._remaining()
        for session in cut:
            server = session.server
            if server is not None and not server.flow.idle:
                self._proxy.cancel_server(server)
            session.fail(bye)
        if cut:
            log.warning("drain: %d client(s) still in a transaction after %.0f s: cancelled",
                        len(cut), timeout)  # fmt: skip
        return len(cut)

    def session_closed(self) -> None:
        """A client left (the drain waits for the last one)."""
        if self.draining:
            self._sessions_changed.set()

    def _remaining(self) -> list[ClientSession]:
        return [s for s in self._proxy.sessions if not s.closed and not s.is_admin]

    def _pools(self, database: str | None) -> list[tuple[str, Pool]]:
        """(client database name, pool) for every pool of ``database`` (None: all)."""
        return [
            (db, pool)
            for (db, _), pool in self._proxy.pools.items()
            if database is None or db == database
        ]
