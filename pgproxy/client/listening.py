"""The session's LISTEN/NOTIFY side: LISTEN answered without a server, notification delivery.

Owns what a session does for the listener it subscribes through: a Query of only
LISTEN/UNLISTEN (and ``pg_listening_channels()``) answered without a server, at once when
every channel is live upstream, else from a task that waits for the upstream LISTEN; the fence
that holds a ReadyForQuery after a possible NOTIFY until the client's own notifications are
delivered with its virtual PID; delivery (now between transactions, held during one, bounded
both ways: a slow reader is reset, a client that holds too many is closed); and what a lost
listener connection means for the client (``listener_loss``).

Rule: the session stays the listener's subscriber, so fan-out reaches :meth:`notify` with no
hop; the channel sets live in the listener, the held notifications in
:class:`~pgproxy.client.subscriptions.Subscriptions`. Part of the one client object:
``units.py`` <- ``stream.py`` <- this <- ``session.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final

from pgproxy import sql
from pgproxy.backend import ServerConnection
from pgproxy.client import stream
from pgproxy.client.host import ProxyServices
from pgproxy.client.stream import ClientStream
from pgproxy.client.subscriptions import (
    Subscriptions,
    is_listening_channels_query,
    listening_channels_reply,
    notifications_in,
    subscription_query,
    subscription_tags,
    truncation_notices,
)
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.pubsub.listener import Listener
from pgproxy.wire import log

_IDLE: Final = m.IDLE


class ClientListening(ClientStream):
    __slots__ = ("_doomed", "_task")

    def __init__(self, proxy: ProxyServices) -> None:
        super().__init__(proxy)
        self._task: asyncio.Task[None] | None = None  # login, or a LISTEN waiting upstream
        self._doomed: PgError | None = None  # to be disconnected at its next ReadyForQuery I

    # --- LISTEN without a server -------------------------------------------------------------

    def _fast_path_allowed(self) -> bool:
        """LISTEN can be answered here only where pglast reads the text as the server would."""
        pool = self.pool
        return (
            (self.settings.text_ok or self.settings.text_rules_ok())
            and pool is not None
            and pool.mode == "transaction"
            and self._doomed is None
        )

    def _answer_without_server(self, body: bytes) -> bool | None:
        if is_listening_channels_query(body):
            self.write(listening_channels_reply(self._channels()) + self._ready_idle())
            return True
        statements = subscription_query(body)
        if statements is None:
            return None
        return self._subscribe(statements, truncation_notices(body, statements))

    def _subscribe(self, statements: list[sql.Subscription], notices: bytes = b"") -> bool:
        """Answer a Query made only of LISTEN/UNLISTEN without a server, byte for byte.

        The statements form one implicit transaction: their combined effect is applied all at
        once, and only once every channel it adds is live upstream. True: answered now (the
        usual case: other clients listen to those channels already). False: the answer waits
        in a task for the upstream LISTEN; the client's input waits meanwhile.
        """
        assert self.pool is not None
        listener = self.proxy.listener_for(self.pool)
        self._subscriptions().listener = listener
        channels = sql.apply_effects(self._channels(), list(statements))
        wanted = set(channels)
        if listener.update_now(self, wanted):
            self._channels_committed(channels)
            self.write(notices + subscription_tags(statements) + self._ready_idle())
            return True
        self._task = asyncio.get_running_loop().create_task(
            self._answer_subscriptions(listener, statements, channels, notices)
        )
        return False

    async def _answer_subscriptions(
        self,
        listener: Listener,
        statements: list[sql.Subscription],
        channels: list[str],
        notices: bytes,
    ) -> None:
        try:
            await listener.update(self, set(channels))
        except PgError as exc:
            err = exc.with_severity("ERROR")
            reply = m.error_response(err.fields())
        else:
            self._channels_committed(channels)
            reply = subscription_tags(statements)
        if self._task is asyncio.current_task():
            self._task = None  # a finished task would stay with the client (~0.7 KiB)
        self.write(notices + reply + self._ready_idle())  # the scanner's notices come first
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
                self._count_slow_consumer(notifications_in(data))
                self.write(m.error_response(_overflow("it is not reading them").fields()))
                self.reset()  # its buffer will never drain: do not wait for it
                return
            self.write(data)
            return
        subs = self._subscriptions()
        if not subs.hold(data, self.proxy.config.proxy.notify_pending_limit):
            log.warning("%r: too many notifications held during a transaction", self)
            self._count_slow_consumer(subs.drop_held())
            self.fail(_overflow("it stayed inside a transaction while they piled up"))

    def _count_slow_consumer(self, dropped: int) -> None:
        """A client cut off for not taking its notifications, ``dropped`` of them lost."""
        listener = self.subs.listener if self.subs is not None else None
        if listener is not None:
            listener.slow_consumers += 1
            listener.dropped += dropped

    def listener_lost(self, error: PgError) -> None:
        """The listener connection died: notifications may have been lost in the gap."""
        if self.proxy.config.proxy.listener_loss == "keep":
            return
        doom = fatal(
            error.sqlstate if error.sqlstate[:2] in ("08", "57") else errors.CONNECTION_FAILURE,
            f"pgproxy lost its listener connection: {error.message}",
            hint="notifications sent meanwhile may be lost; reconnect and read the current state",
        )
        subs = self.subs
        if subs is not None and subs.listener is not None:
            subs.listener.dropped += subs.drop_held()
        if self.mode == stream.UNLINKED or self.mode == stream.SKIPPING:
            self.fail(doom)
        else:
            self._doomed = doom  # ends at its next ReadyForQuery I, not mid-transaction


def _overflow(why: str) -> PgError:
    return fatal(
        errors.OUT_OF_MEMORY,
        "pgproxy: notification buffer overflow, disconnecting",
        detail=f"Notifications for this session exceeded the proxy's buffer because {why}.",
    )
