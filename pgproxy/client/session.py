"""One client's life: connection, login hand-off, ReadyForQuery duties, drain, timers.

Owns what happens around the read loop: the login task and its hand-off (the client's first
ParameterStatus, BackendKeyData and ReadyForQuery; to a pool, or to the admin console, whose
commands that wait it awaits), the pool's answer to a wait for a server, what goes just
before each ReadyForQuery (``on_ready``: settled transaction effects, parameter corrections,
held notifications, a doomed client's close), closing at a transaction boundary (drain), the
idle-in-transaction timer, cancel, and the teardown.

Rule: one object in four files by linear inheritance (asyncpg's CoreProtocol/BaseProtocol
shape): :class:`~pgproxy.client.units.ClientUnits` (who the client is and what each message
does) <- :class:`~pgproxy.client.stream.ClientStream` (the read loop and ``mode``) <-
:class:`~pgproxy.client.listening.ClientListening` (LISTEN/NOTIFY) <- this class; no call
between them costs a hop. Teardown is in one place, :meth:`_end_transaction_state`, used by
``on_lost`` and ``server_lost``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable
from typing import Final, Protocol

from pgproxy import pacing
from pgproxy.admin.commands import Result
from pgproxy.admin.console import Console, greeting
from pgproxy.backend import ServerConnection
from pgproxy.client import stream
from pgproxy.client.host import ProxyServices
from pgproxy.client.listening import ClientListening
from pgproxy.client.login import Login, log_in
from pgproxy.client.settings import ClientSettings
from pgproxy.pool.giveback import give_back
from pgproxy.pool.pool import Pool
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.wire import WireProtocol, log

_IDLE: Final = m.IDLE
_AUTH_OK: Final = m.authentication_ok()
_READY_IDLE: Final = m.ready_for_query(_IDLE)
_STATUS_BLOCKS = 256
_status_blocks: dict[tuple[tuple[str, str], ...], bytes] = {}


def _status_block(parameters: tuple[tuple[str, str], ...]) -> bytes:
    """The ParameterStatus messages of a greeting; most logins of a pool send the same ones,
    so they are built once (up to 256 distinct sets, then all forgotten at once)."""
    block = _status_blocks.get(parameters)
    if block is None:
        if len(_status_blocks) >= _STATUS_BLOCKS:
            _status_blocks.clear()
        block = _status_blocks[parameters] = b"".join(
            m.parameter_status(k, v) for k, v in parameters
        )
    return block


class SessionHost(ProxyServices, Protocol):
    """What the session needs from its proxy beyond :class:`ProxyServices`: the calls that
    take the session itself (``pgproxy.app.Proxy`` satisfies it)."""

    def client_opened(self, client: ClientSession) -> None: ...
    def client_closed(self, client: ClientSession) -> None: ...
    def register(self, client: ClientSession) -> tuple[int, bytes]: ...


class ClientSession(ClientListening):
    __slots__ = ("_host", "connected_at", "key_length", "local", "peer", "secret")

    def __init__(self, proxy: SessionHost, local: bool = False) -> None:
        super().__init__(proxy)
        self._host = proxy  # the same object as ``proxy``, seen with the calls taking a session
        self.secret = b""
        self.key_length = 4  # of the cancel key it is given (BackendKeyData)
        self.peer = ""
        self.local = local  # came through the unix-domain socket (told by its listener)
        self.connected_at = time.monotonic()

    def __repr__(self) -> str:
        return f"<client {self.vpid} {self.user}@{self.database} {self.peer}>"

    # --- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Not inferred from the peer name: a TCP client reset early has none (fail closed:
        # no address, so it matches only rules for "all").
        peer = transport.get_extra_info("peername")
        if self.local:
            self.peer = "[local]"
        else:
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "[unknown]"
        self._host.client_opened(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # direct TLS (pgproxy.accept): encrypted from the first byte
            self.tls = True
            if ssl_object.selected_alpn_protocol() != "postgresql":
                # As Postgres: without ALPN nothing says the client meant to speak PostgreSQL
                # over this TLS (ALPACA-style cross-protocol attacks); closed without a word.
                log.info("direct TLS from %s without ALPN postgresql: refused", self.peer)
                self.end_reason = "direct TLS without ALPN"
                self.close()
                return
        self._pacer = pacer = pacing.pacer()
        pacer.admit(self._start_login)

    def _start_login(self) -> bool:
        """Start the login task (its turn has come); False: the client already left."""
        if self.closed or not self._handshaking:  # gone, or logged in by hand (testing.memory)
            return False
        self._task = asyncio.get_running_loop().create_task(self._login())
        return True

    def on_lost(self, exc: Exception | None) -> None:
        self._host.client_closed(self)
        if self.vpid:  # it had logged in
            self._log_logout(exc)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        server = self.stream_lost()
        self._cancel_idle_tx_timer()
        self._end_transaction_state()
        subs = self.subs
        if subs is not None and subs.listener is not None:
            subs.listener.dropped += subs.drop_held()  # it left inside a transaction
            subs.listener.drop(self)
        if server is not None and self.pool is not None:
            give_back(self.pool, server, self.proxy.spawn, mid_message=self._passthrough > 0)

    def _end_transaction_state(self) -> None:
        """The server running this client's transaction is gone: nothing of it committed."""
        subs = self.subs
        if subs is not None:
            subs.unmap_pid(self.vpid)
            subs.may_have_notified = False
        if self.pending is not None:
            self._unhold(self.pending.lost())

    def fail(self, error: PgError) -> None:
        """Tell the client and, for a FATAL error, close."""
        if self.closed:
            return
        self.write(m.error_response(error.fields()))
        if error.fatal:
            self.end_reason = self.end_reason or error.message
            self.close()

    def _log_fields(self) -> dict[str, object]:
        return {"user": self.user, "database": self.database, "addr": self.peer, "tls": self.tls}

    def _log_logout(self, exc: Exception | None) -> None:
        duration = time.monotonic() - self.connected_at
        reason = self.end_reason or (f"connection lost: {exc}" if exc else "client closed")
        log.info(
            "logout: db=%s user=%s addr=%s duration=%.3fs reason=%s",
            self.database,
            self.user,
            self.peer,
            duration,
            reason,
            extra={
                "event": "client_logout",
                **self._log_fields(),
                "duration_s": round(duration, 6),
                "reason": reason,
            },
        )

    # --- login -------------------------------------------------------------------------------

    async def _login(self) -> None:
        timeout = self.proxy.config.proxy.client_login_timeout
        try:
            async with asyncio.timeout(timeout or None):
                login = await log_in(self, self.proxy, self.local)
                if login is None:
                    return
                self.user, self.database = login.user, login.database
                if login.protocol_minor >= 2:
                    self.key_length = 32  # 3.2: a longer key (4 bytes under 3.0), as Postgres 18
                if login.console is not None:
                    self._open_console(login)
                else:
                    assert login.pool is not None
                    await self._hand_off(login.pool, login.settings, login.server)
            if self._task is asyncio.current_task():
                self._task = None  # a finished task held by every idle client (~0.7 KiB)
        except PgError as exc:
            if not exc.fatal:
                exc = exc.with_severity("FATAL")
            log.info("login failed for %s: %s", self.peer, exc.message)
            self.fail(exc)
        except m.ProtocolError as exc:
            self.fail(fatal(errors.PROTOCOL_VIOLATION, str(exc)))
        except TimeoutError:
            self.fail(fatal(errors.QUERY_CANCELED, "canceling authentication due to timeout"))
        except ConnectionError:
            self.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%r: internal error during login", self)
            self.fail(fatal(errors.INTERNAL_ERROR, "internal error in pgproxy during login"))

    async def _hand_off(
        self, pool: Pool, settings: ClientSettings, server: ServerConnection | None
    ) -> None:
        """Login succeeded: greet the client and start streaming. From the first write to the
        link nothing awaits (in transaction mode), so the server cannot be stranded."""
        self.pool, self.settings = pool, settings
        assert pool.server_params is not None
        shown = dict(pool.server_params)
        shown.update(settings.reported)
        self._greet(shown)
        pool.stats.client_login_count += 1
        if pool.mode == "session":
            if server is None:
                server = await pool.acquire(self.proxy.config.proxy.query_wait_timeout)
            self._link(server)
        else:
            self.begin_streaming()
            if server is not None:
                pool.release(server)
        log.info(
            "login: db=%s user=%s addr=%s tls=%s",
            self.database,
            self.user,
            self.peer,
            "on" if self.tls else "off",
            extra={"event": "client_login", **self._log_fields()},
        )
        self.end_handshake()

    def _open_console(self, login: Login) -> None:
        """Logged in to the admin console: it answers from now on (no pool, no server)."""
        assert login.console is not None
        self.settings = login.settings
        self._greet(greeting(login.settings.reported.get("application_name", "")))
        self.begin_console(Console(self.proxy, login.user, login.console))
        log.debug("%r: logged in to the admin console", self)
        self.end_handshake()

    def _console_read(self, data: bytes) -> None:
        """What an admin console client sent: the console answers."""
        console = self.console
        assert console is not None
        self.write(console.feed(data))
        self._console_next(console)

    def _console_next(self, console: Console) -> None:
        """A command that waits (PAUSE, WAIT_CLOSE) answers from a task; later input waits
        in the console meanwhile."""
        waiting = console.waiting
        if waiting is not None:
            self.proxy.spawn(self._console_wait(console, waiting))
        elif console.finished:
            self.close()

    async def _console_wait(self, console: Console, waiting: Awaitable[Result]) -> None:
        outcome: Result | PgError
        try:
            outcome = await waiting
        except PgError as exc:
            outcome = exc
        if not self.closed:
            self.write(console.resume(outcome))
            self._console_next(console)

    def _greet(self, parameters: dict[str, str]) -> None:
        """AuthenticationOk, the parameters, a virtual PID and secret, ReadyForQuery."""
        self.vpid, self.secret = self._host.register(self)
        self.write(
            _AUTH_OK
            + _status_block(tuple(parameters.items()))
            + m.backend_key_data(self.vpid, self.secret)
            + _READY_IDLE
        )

    # --- getting a server, and what the server sees of the session ---------------------------

    def _server_ready(self, server: ServerConnection | None, error: BaseException | None) -> None:
        """The pool answered a request made by ``_try_link`` (maybe from inside a release)."""
        request, self._request = self._request, None
        if request is not None and self.pool is not None:
            # A server handed over by a release was just stamped (idle_since): no clock read.
            now = server.idle_since if server is not None else time.monotonic()
            if now > request.started:
                self.pool.stats.wait_seconds += now - request.started
        if server is None:
            if isinstance(error, PgError):
                self._fail_unit(error)
            else:
                log.error("%r: getting a server failed: %r", self, error)
                self.fail(fatal(errors.INTERNAL_ERROR, "internal error in pgproxy"))
            return
        if self.closed:
            server.pool.release(server)
            return
        self._link(server)
        self._resume_input()

    def waiting_since(self) -> float:
        """When it started waiting for a server (0: it is not waiting for one)."""
        request = self._request
        return request.started if request is not None else 0.0

    def server_output(self, data: bytes) -> None:
        self.write(data)

    def feeder(self) -> WireProtocol | None:
        # The console's answers are fed by the client's own requests: one that does not read
        # them is not read either until they drain.
        return self if self.console is not None else self.server

    # --- just before each ReadyForQuery ------------------------------------------------------

    def server_parameter(self, name: str, value: str) -> None:
        self.settings.server_reported(name, value)

    def on_ready(self, status: int) -> bytes:
        """Called just before a ReadyForQuery reaches the client: what must precede it."""
        server = self.server
        pending = self.pending
        if pending is not None:
            self._settle_pending(pending, status)
        out = b""
        settings = self.settings
        if settings.corrections_due:
            out, changed = settings.corrections()
            if changed and server is not None:
                server.param_state = None
        if status == _IDLE:
            if server is not None and (pending is None or not pending.open):
                server.watch_tags = False
            if self._doomed is not None:
                asyncio.get_running_loop().call_soon(self._end_doomed)
                return out
            subs = self.subs
            if subs is None or not subs.held:
                return out
            return out + subs.take_held()
        if server is not None and not server.flow.pending:
            self._idle_tx_since = time.monotonic()
            timeout = self.proxy.config.proxy.idle_transaction_timeout
            if timeout > 0:
                self._idle_tx_timer = asyncio.get_running_loop().call_later(
                    timeout, self._idle_transaction_expired
                )
        return out

    def server_lost(self, error: PgError) -> None:
        self._end_transaction_state()
        super().server_lost(error)

    def _end_doomed(self) -> None:
        """A doomed client is closed only between transactions: not while its server still
        owes it replies (a pipeline) or a transaction is open (the next ReadyForQuery I
        calls this again)."""
        if self._doomed is not None and not self._in_a_transaction():
            self.fail(self._doomed)

    def _in_a_transaction(self) -> bool:
        server = self.server
        if server is None:
            return False
        flow = server.flow
        return bool(flow.pending) or flow.unsynced or flow.copy_in or flow.in_transaction

    @property
    def is_admin(self) -> bool:
        """An admin console session (it stays through a drain)."""
        return self.mode == stream.ADMIN

    def close_at_boundary(self, error: PgError) -> None:
        """Close with ``error`` now if the client is between transactions, else at the end
        of its transaction or pipeline (drain). A client waiting for a server has started
        nothing: it goes now, and reconnects elsewhere."""
        if self.closed or self.is_admin:
            return
        if self.mode == stream.LINKED and self._in_a_transaction():
            self._doomed = error
            return
        self.fail(error)

    # --- timers and cancel -------------------------------------------------------------------

    def _idle_tx_ended(self) -> None:
        """The client spoke again after going idle inside a transaction."""
        if self.server is not None:
            self.server.idle_in_tx += time.monotonic() - self._idle_tx_since
        self._idle_tx_since = 0.0
        self._cancel_idle_tx_timer()

    def _cancel_idle_tx_timer(self) -> None:
        if self._idle_tx_timer is not None:
            self._idle_tx_timer.cancel()
            self._idle_tx_timer = None

    def _idle_transaction_expired(self) -> None:
        self._idle_tx_timer = None
        server = self.unlink_for_close()
        if server is not None:
            server.pool.close_server(server)
        self.fail(
            fatal(
                errors.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
        )

    def cancel_waiting(self) -> bool:
        """A cancel for a client still queued for a server: drop its request (57014)."""
        request = self._request
        if self.mode != stream.WAITING or request is None or request.done:
            return False
        request.cancel()
        self._fail_unit(PgError(errors.QUERY_CANCELED, "canceling statement due to user request"))
        return True

    def matches_secret(self, secret: bytes) -> bool:
        return hmac.compare_digest(self.secret, secret)
