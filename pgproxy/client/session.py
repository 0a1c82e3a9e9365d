"""One client's life: connection, login hand-off, ReadyForQuery duties, notifications, timers.

Owns what happens around the read loop: the login task and its hand-off (the client's first
ParameterStatus, BackendKeyData and ReadyForQuery), what goes just before each ReadyForQuery
(``on_ready``: settled transaction effects, parameter corrections, held notifications), the
LISTEN fast path, notification delivery and the slow-consumer limits, the fence that attributes
a client's own notifications, the idle-in-transaction timer, cancel, and the teardown.

Rule: one object in three files by linear inheritance (asyncpg's CoreProtocol/BaseProtocol
shape): :class:`~pgproxy.client.units.ClientUnits` (who the client is and what each message
does) <- :class:`~pgproxy.client.stream.ClientStream` (the read loop and ``mode``) <- this
class (the session's life); no call between them costs a hop. The session stays the
listener's subscriber, so fan-out reaches it directly. Teardown is in one place,
:meth:`_end_transaction_state`, used by ``on_lost`` and ``server_lost``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Coroutine
from typing import Any, Final, Protocol

from pgproxy import sql
from pgproxy.backend import ServerConnection
from pgproxy.client import stream
from pgproxy.client.host import ProxyServices
from pgproxy.client.login import log_in
from pgproxy.client.settings import ClientSettings
from pgproxy.client.stream import ClientStream
from pgproxy.client.subscriptions import (
    Subscriptions,
    is_listening_channels_query,
    listening_channels_reply,
    subscription_query,
    subscription_tags,
)
from pgproxy.pool.pool import Pool
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.pubsub.listener import Listener
from pgproxy.wire import log

_IDLE: Final = m.IDLE


class SessionHost(ProxyServices, Protocol):
    """What the session needs from its proxy beyond :class:`ProxyServices`: the calls that
    take the session itself (``pgproxy.app.Proxy`` satisfies it)."""

    def client_opened(self, client: ClientSession) -> None: ...
    def client_closed(self, client: ClientSession) -> None: ...
    def register(self, client: ClientSession) -> tuple[int, bytes]: ...


class ClientSession(ClientStream):
    __slots__ = (
        "_doomed",
        "_host",
        "_task",
        "connected_at",
        "end_reason",
        "local",
        "peer",
        "secret",
    )

    def __init__(self, proxy: SessionHost, local: bool = False) -> None:
        super().__init__(proxy)
        self._host = proxy  # the same object as ``proxy``, seen with the calls taking a session
        self.secret = b""
        self.peer = ""
        self.local = local  # came through the unix-domain socket (told by its listener)
        self.connected_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._doomed: PgError | None = None  # to be disconnected at its next ReadyForQuery I
        self.end_reason = ""  # why the proxy ended it (its FATAL, "admin"); "": the client left

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
        self._task = asyncio.get_running_loop().create_task(self._login())

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
            subs.listener.drop(self)
        if server is not None and self.pool is not None:
            self.pool.give_back(server, self.proxy.spawn)

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
        out = [m.authentication_ok()]
        assert pool.server_params is not None
        shown = dict(pool.server_params)
        shown.update(settings.reported)
        out += [m.parameter_status(k, v) for k, v in shown.items()]
        self.vpid, self.secret = self._host.register(self)
        out.append(m.backend_key_data(self.vpid, self.secret))
        out.append(m.ready_for_query(_IDLE))
        self.write(b"".join(out))
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
        if settings.has_corrections:
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

    # --- LISTEN without a server -------------------------------------------------------------

    def _fast_path_allowed(self) -> bool:
        """LISTEN can be answered here only where pglast reads the text as the server would."""
        pool = self.pool
        return (
            self.settings.text_rules_ok()
            and pool is not None
            and pool.mode == "transaction"
            and self._doomed is None
        )

    def _answer_without_server(self, body: bytes) -> bool | None:
        if is_listening_channels_query(body):
            listener = self.subs.listener if self.subs is not None else None
            channels = sorted(listener.channels_of(self)) if listener is not None else []
            self.write(listening_channels_reply(channels) + self._ready_idle())
            return True
        statements = subscription_query(body)
        if statements is None:
            return None
        return self._subscribe(statements)

    def _subscribe(self, statements: list[sql.Subscription]) -> bool:
        """Answer a Query made only of LISTEN/UNLISTEN without a server, byte for byte.

        The statements form one implicit transaction: their combined effect is applied all at
        once, and only once every channel it adds is live upstream. True: answered now (the
        usual case: other clients listen to those channels already). False: the answer waits
        in a task for the upstream LISTEN; the client's input waits meanwhile.
        """
        assert self.pool is not None
        listener = self.proxy.listener_for(self.pool)
        self._subscriptions().listener = listener
        wanted = sql.apply_effects(listener.channels_of(self), list(statements))
        if listener.update_now(self, wanted):
            self.write(subscription_tags(statements) + self._ready_idle())
            return True
        self._task = asyncio.get_running_loop().create_task(
            self._answer_subscriptions(listener, statements, wanted)
        )
        return False

    async def _answer_subscriptions(
        self, listener: Listener, statements: list[sql.Subscription], wanted: set[str]
    ) -> None:
        try:
            await listener.update(self, wanted)
        except PgError as exc:
            err = exc.with_severity("ERROR")
            reply = m.error_response(err.fields())
        else:
            reply = subscription_tags(statements)
        if self._task is asyncio.current_task():
            self._task = None  # a finished task would stay with the client (~0.7 KiB)
        self.write(reply + self._ready_idle())
        self._waiting_answered()

    # --- NOTIFY: attribution fence and delivery ----------------------------------------------

    def wants_stall(self, status: int) -> bool:
        """Hold a ReadyForQuery I after a possible NOTIFY until a listener fence completes.

        Directly connected, a session gets its own notifications before that ReadyForQuery,
        and their PID is its own; the fence makes both true through the proxy.
        """
        subs = self.subs
        if subs is None:
            self.may_stall = False
            return False
        stall = self._wants_stall(subs, status)
        self.may_stall = subs.may_have_notified or subs.fence_done
        return stall

    def _wants_stall(self, subs: Subscriptions, status: int) -> bool:
        if subs.fence_done:
            subs.fence_done = False
            return False
        if status != _IDLE or not subs.may_have_notified:
            return False
        subs.may_have_notified = False
        server, pool = self.server, self.pool
        listener = self.proxy.existing_listener(pool) if pool is not None else None
        if server is None or listener is None or not listener.channels:
            subs.unmap_pid(self.vpid)
            return False  # nobody listens on this database: nothing to attribute or deliver
        subs.pid_mapped = None  # the fence unmaps it when it ends
        self.proxy.spawn(self._fence(listener.fence(server.pid, self.vpid), server))
        return True

    async def _fence(self, fence: Coroutine[Any, Any, None], server: ServerConnection) -> None:
        try:
            await fence
        except (PgError, ConnectionError) as exc:
            log.warning("%r: listener fence failed: %s", self, exc)
        self._subscriptions().fence_done = self.may_stall = True
        server.resume_stream()

    def notify(self, data: bytes) -> None:
        """Notifications for this client (whole NotificationResponses, in order): written now
        if it is between transactions, else held until its transaction ends."""
        if self.closed or self._doomed is not None:
            return
        if self.mode == stream.UNLINKED:
            # Only a client whose earlier output is still queued can be a slow reader (and
            # only then is the setting looked up: this runs per client per notification).
            queued = self.transport.get_write_buffer_size()
            if queued and queued + len(data) > self.proxy.config.proxy.notify_buffer_size:
                log.warning("%r: not reading notifications; disconnecting", self)
                self.end_reason = "not reading notifications"
                self.write(m.error_response(_overflow("it is not reading them").fields()))
                self.reset()  # its buffer will never drain: do not wait for it
                return
            self.write(data)
            return
        if not self._subscriptions().hold(data, self.proxy.config.proxy.notify_pending_limit):
            log.warning("%r: too many notifications held during a transaction", self)
            self.fail(_overflow("it stayed inside a transaction while they piled up"))

    def listener_lost(self, error: PgError) -> None:
        """The listener connection died: notifications may have been lost in the gap."""
        if self.proxy.config.proxy.listener_loss == "keep":
            return
        doom = fatal(
            error.sqlstate if error.sqlstate[:2] in ("08", "57") else errors.CONNECTION_FAILURE,
            f"pgproxy lost its listener connection: {error.message}",
            hint="notifications sent meanwhile may be lost; reconnect and read the current state",
        )
        if self.subs is not None:
            self.subs.drop_held()
        if self.mode == stream.UNLINKED or self.mode == stream.SKIPPING:
            self.fail(doom)
        else:
            self._doomed = doom  # ends at its next ReadyForQuery I, not mid-transaction

    def _end_doomed(self) -> None:
        if self._doomed is not None:
            self.fail(self._doomed)

    # --- timers and cancel -------------------------------------------------------------------

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

    def matches_secret(self, secret: bytes) -> bool:
        return hmac.compare_digest(self.secret, secret)


def _overflow(why: str) -> PgError:
    return fatal(
        errors.OUT_OF_MEMORY,
        "pgproxy: notification buffer overflow, disconnecting",
        detail=f"Notifications for this session exceeded the proxy's buffer because {why}.",
    )
