"""One upstream listener connection per database, and the subscriptions multiplexed onto it.

Theory of operation (DESIGN.md, "LISTEN / UNLISTEN / NOTIFY in transaction mode"):

* Each channel counts its references: subscribers plus subscriptions still being set up. The
  first reference makes the listener connection run ``LISTEN``; the last one leaving makes it
  run ``UNLISTEN`` at once. All commands go down the one connection in the order they were
  decided, so "last subscriber left" can never overtake "first subscriber joined".
* A subscription is acknowledged only when true: ``update()`` returns once every added channel's
  ``LISTEN`` has completed upstream, and only then does the client join the channel's members.
  A NOTIFY committed after the client saw ``CommandComplete LISTEN`` therefore reaches it.
* Fan-out builds the NotificationResponse once and hands the same bytes to every member; each
  member decides whether to write now or hold it until its transaction ends. Notifications are
  handed out at the end of each upstream read, all of a member's in one piece (one write):
  when they are all for one channel (the usual case, a single one included) every member gets
  the same bytes, without per-member collecting.
* The listener never stops reading. If its connection dies, subscribers are told (the policy of
  what to do is theirs) and the listener reconnects with backoff and re-LISTENs every channel
  that still has members.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from pgproxy.backend import ServerConnection
from pgproxy.params import quote_ident
from pgproxy.pool.pool import Pool
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.wire import log

_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0
# TCP keepalive for the listener socket: the kernel probes an idle connection, and
# TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged (PROTOCOL-NOTES 35).
_KEEPALIVE_IDLE = 30
_KEEPALIVE_INTERVAL = 10
_KEEPALIVE_COUNT = 3
_USER_TIMEOUT_MS = 60_000


class Subscriber(Protocol):
    def notify(self, data: bytes) -> None:
        """Take notifications (whole NotificationResponses, in order)."""
        ...

    def listener_lost(self, error: PgError) -> None: ...


class _Channel:
    __slots__ = ("delivered", "members", "ready", "received", "refs")

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.refs = 0
        self.ready = ready  # completes when the upstream LISTEN is in effect
        self.members: set[Subscriber] = set()
        self.received = 0  # notifications on it while it had members (the admin console)
        self.delivered = 0  # ... times the members they were handed to


class Listener:
    def __init__(self, pool: Pool, ping_interval: float = 30.0, ping_timeout: float = 10.0) -> None:
        self.pool = pool  # a dedicated pool of one: the listener connection
        # A listener only reads, so a silently dead connection (NAT timeout, failover) would
        # never be noticed: every ping_interval an empty query must come back within
        # ping_timeout, or the connection is dropped and re-made (0 disables the ping).
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._pinger: asyncio.Task[None] | None = None
        self.conn: ServerConnection | None = None
        self.channels: dict[str, _Channel] = {}
        self.subscriptions: dict[Subscriber, set[str]] = {}
        self._connecting: asyncio.Task[ServerConnection] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self.closing = False
        # For the admin console (SHOW LISTENERS): notifications received from upstream,
        # handed to subscribers (one per subscriber), handed but never delivered (held during
        # a transaction and discarded, or a slow consumer's when it was cut off; counted by
        # the session), subscribers cut off for not reading them (counted by the session),
        # successful reconnects, and the last failure.
        self.notifications = 0
        self.delivered = 0
        self.dropped = 0
        self.slow_consumers = 0
        self.reconnects = 0
        self.last_error: str | None = None
        # Real backend PID -> virtual PID, only while that backend's client runs a fence.
        self._pid_map: dict[int, int] = {}
        # (channel, NotificationResponse) received during the current upstream read, handed
        # out at its end: one write per member per read, not one per notification.
        self._batch: list[tuple[_Channel, bytes]] = []

    def __repr__(self) -> str:
        return f"<listener {self.pool.name} channels={len(self.channels)}>"

    # --- subscriptions -----------------------------------------------------------------------

    async def update(self, client: Subscriber, wanted: set[str]) -> None:
        """Make ``client``'s channel set exactly ``wanted``, all or nothing.

        Returns once every added channel is live upstream; raises PgError (nothing changed) if
        the listener cannot make them live.
        """
        current = self.subscriptions.get(client, set())
        added = [c for c in wanted if c not in current]
        taken: list[str] = []
        # Reference counts are taken first, so concurrent changes cannot drop the channels.
        try:
            for name in added:
                self._take(name)
                taken.append(name)
            for name in added:
                await asyncio.shield(self.channels[name].ready)
        except BaseException:
            for name in taken:
                self._release(name)
            raise
        self._join(client, current, wanted)

    def update_now(self, client: Subscriber, wanted: set[str]) -> bool:
        """``update`` without waiting, when every added channel is live upstream already;
        False (nothing changed) when one is not, or failed: then ``update`` must wait."""
        current = self.subscriptions.get(client, set())
        added = [c for c in wanted if c not in current]
        for name in added:
            channel = self.channels.get(name)
            if channel is None or not channel.ready.done() or channel.ready.exception():
                return False
        for name in added:
            self._take(name)
        self._join(client, current, wanted)
        return True

    def set_channels(self, client: Subscriber, wanted: set[str]) -> None:
        """Make ``client``'s channel set ``wanted`` now (a transaction just committed).

        Channels new to the listener start their upstream LISTEN here; the slow path holds
        them (``hold``) from the moment the LISTEN is seen, so they are normally live already.
        """
        current = self.subscriptions.get(client, set())
        for name in wanted - current:
            self._take(name)
        self._join(client, current, wanted)

    def _join(self, client: Subscriber, current: set[str], wanted: set[str]) -> None:
        """Membership follows ``wanted``; references for added channels are already taken."""
        for name in wanted - current:
            self.channels[name].members.add(client)
        for name in current - wanted:
            self.channels[name].members.discard(client)
            self._release(name)
        if wanted:
            self.subscriptions[client] = set(wanted)
        else:
            self.subscriptions.pop(client, None)

    def pending_readiness(self, names: Iterable[str]) -> list[asyncio.Future[None]]:
        """The upstream LISTENs among ``names`` that are not in effect yet."""
        out = []
        for name in names:
            channel = self.channels.get(name)
            if channel is not None and not channel.ready.done():
                out.append(channel.ready)
        return out

    def hold(self, name: str) -> None:
        """Keep a channel LISTENed upstream while a transaction that LISTENs it is open."""
        self._take(name)

    def unhold(self, name: str) -> None:
        self._release(name)

    def drop(self, client: Subscriber) -> None:
        """Forget a client that has gone."""
        for name in self.subscriptions.pop(client, ()):
            channel = self.channels.get(name)
            if channel is not None:
                channel.members.discard(client)
                self._release(name)

    def _take(self, name: str) -> None:
        channel = self.channels.get(name)
        if channel is None:
            channel = _Channel(asyncio.get_running_loop().create_future())
            channel.ready.add_done_callback(_consume_exception)
            self.channels[name] = channel
            self._spawn_listen(name, channel)
        channel.refs += 1

    def _release(self, name: str) -> None:
        channel = self.channels.get(name)
        if channel is None:
            return
        channel.refs -= 1
        if channel.refs > 0:
            return
        del self.channels[name]
        conn = self.conn
        if channel.ready.done() and not channel.ready.exception() and conn and not conn.closed:
            conn.send_internal(f"UNLISTEN {quote_ident(name)}")
        # A LISTEN still being set up will find the channel gone and undo itself.

    def _spawn_listen(self, name: str, channel: _Channel) -> None:
        task = asyncio.get_running_loop().create_task(self._listen(name, channel))
        task.add_done_callback(_consume_exception)

    async def _listen(self, name: str, channel: _Channel) -> None:
        try:
            conn = await self._connection()
            result = await conn.run_internal(f"LISTEN {quote_ident(name)}")
            if result.error is not None:
                raise result.error
        except PgError as exc:
            self.last_error = exc.message
            if not channel.ready.done():
                channel.ready.set_exception(exc)
            return
        except ConnectionError as exc:
            if not channel.ready.done():
                channel.ready.set_exception(
                    PgError(errors.CONNECTION_FAILURE, f"listener connection lost: {exc}")
                )
            return
        if self.channels.get(name) is not channel and not conn.closed:
            # Every reference left while the LISTEN was in flight.
            conn.send_internal(f"UNLISTEN {quote_ident(name)}")
        if not channel.ready.done():
            channel.ready.set_result(None)

    # --- the connection ----------------------------------------------------------------------

    async def _connection(self) -> ServerConnection:
        conn = self.conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
            self._connecting.add_done_callback(_consume_exception)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> ServerConnection:
        if self.closing:
            raise PgError(errors.ADMIN_SHUTDOWN, "pgproxy is shutting down")
        conn = await self.pool.acquire(self.pool.settings.connect_timeout)
        conn.notification_sink = self._on_notification
        conn.notifications_done = self._flush
        conn.lost_callback = self._on_lost
        self.conn = conn
        _enable_keepalive(conn)
        if self.ping_interval > 0:
            self._pinger = asyncio.get_running_loop().create_task(self._ping(conn))
        log.info("%r: connected (%r)", self, conn, extra=self._event("listener_connected"))
        return conn

    async def _ping(self, conn: ServerConnection) -> None:
        while not conn.closed and not self.closing:
            await asyncio.sleep(self.ping_interval)
            if conn.closed or self.closing:
                return
            try:
                async with asyncio.timeout(self.ping_timeout or None):
                    await conn.run_internal("")
            except TimeoutError:
                why = f"no answer to a ping within {self.ping_timeout:g}s"
                log.warning("%r: %s; dropping the connection", self, why)
                conn.abort_with(
                    PgError(errors.CONNECTION_FAILURE, f"listener connection lost: {why}")
                )
                return
            except (PgError, ConnectionError):
                return  # the connection's loss is reported through _on_lost

    def map_pid(self, server_pid: int, virtual_pid: int) -> None:
        """Show ``server_pid``'s notifications as ``virtual_pid`` until the fence ends."""
        self._pid_map[server_pid] = virtual_pid

    def unmap_pid(self, server_pid: int, virtual_pid: int) -> None:
        if self._pid_map.get(server_pid) == virtual_pid:
            del self._pid_map[server_pid]

    def fence(self, server_pid: int, virtual_pid: int) -> Coroutine[Any, Any, None]:
        """Wait until every notification committed so far has come through the listener.

        The notifier signals its listeners before its own ReadyForQuery, so once an empty query
        sent now is answered, all notifications committed earlier have been read. From the
        moment its client forwarded a statement that may notify (``map_pid``) until the fence
        ends, notifications from ``server_pid`` carry ``virtual_pid``: that client holds the
        server all along, and every earlier holder that may have notified fenced before
        letting it go, so the attribution is exact (PROTOCOL-NOTES 21-22).
        """
        self.map_pid(server_pid, virtual_pid)
        return self._run_fence(server_pid, virtual_pid)

    async def _run_fence(self, server_pid: int, virtual_pid: int) -> None:
        try:
            conn = await self._connection()
            await conn.run_internal("")
        finally:
            self.unmap_pid(server_pid, virtual_pid)

    def _on_notification(self, body: bytes) -> None:
        self.notifications += 1
        try:
            notification = m.parse_notification(body)
        except m.ProtocolError:
            log.error("%r: malformed NotificationResponse dropped", self)
            return
        channel = self.channels.get(notification.channel)
        if channel is None or not channel.members:
            return
        channel.received += 1
        virtual_pid = self._pid_map.get(notification.pid)
        if virtual_pid is not None:
            body = virtual_pid.to_bytes(4, "big") + body[4:]
        self._batch.append((channel, m.message(m.NOTIFICATION_RESPONSE, body)))

    def _flush(self) -> None:
        """End of an upstream read: hand every member what it gets from this read."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        first = batch[0][0]
        if all(channel is first for channel, _ in batch):
            data = batch[0][1] if len(batch) == 1 else b"".join(message for _, message in batch)
            handed = len(first.members) * len(batch)
            first.delivered += handed
            self.delivered += handed
            for client in list(first.members):
                client.notify(data)
            return
        collected: dict[Subscriber, list[bytes]] = {}
        for channel, message in batch:
            channel.delivered += len(channel.members)
            self.delivered += len(channel.members)
            for client in channel.members:
                collected.setdefault(client, []).append(message)
        for client, messages in collected.items():
            client.notify(b"".join(messages))

    def _on_lost(self, error: PgError) -> None:
        self._flush()  # whole notifications read before the loss still go out, first
        self.conn = None
        if self.closing:
            return
        self.last_error = error.message
        log.warning(
            "%r: listener connection lost: %s",
            self,
            error.message,
            extra=self._event("listener_lost", reason=error.message),
        )
        loop = asyncio.get_running_loop()
        for channel in self.channels.values():
            if not channel.ready.done():
                channel.ready.set_exception(error)  # those subscriptions fail and let go
            # Nothing is live upstream any more until the reconnect has re-LISTENed it.
            channel.ready = loop.create_future()
            channel.ready.add_done_callback(_consume_exception)
        for client in list(self.subscriptions):
            client.listener_lost(error)
        if self.channels and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = _BACKOFF_START
        while self.channels and not self.closing:
            try:
                conn = await self._connection()
                names = list(self.channels)
                result = await conn.run_internal(_listen_all(names))
                if result.error is not None:
                    raise result.error
            except (PgError, ConnectionError) as exc:
                self.last_error = str(exc)
                log.warning(
                    "%r: reconnect failed (%s); retrying in %.1fs",
                    self,
                    exc,
                    delay,
                    extra=self._event("listener_reconnect_failed", reason=str(exc)),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            for name in names:
                channel = self.channels.get(name)
                if channel is None:
                    conn.send_internal(f"UNLISTEN {quote_ident(name)}")  # left meanwhile
                elif not channel.ready.done():
                    channel.ready.set_result(None)
            self.reconnects += 1
            log.info(
                "%r: reconnected, %d channels listening again",
                self,
                len(names),
                extra=self._event("listener_reconnected", channels=len(names)),
            )
            return

    def _event(self, event: str, **fields: object) -> dict[str, object]:
        """A log line's structured fields (JSON logs)."""
        return {"event": event, "database": self.pool.upstream_db, **fields}

    async def close(self) -> None:
        self.closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._pinger is not None:
            self._pinger.cancel()
        await self.pool.close()

    def state(self) -> str:
        """For the admin console: listening (connected, with channels), connected (none),
        reconnecting (after a loss), connecting (the first time), or disconnected."""
        conn = self.conn
        if conn is not None and not conn.closed:
            return "listening" if self.channels else "connected"
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return "reconnecting"
        if self._connecting is not None and not self._connecting.done():
            return "connecting"
        return "disconnected"

    def stats(self) -> dict[str, int]:
        return {
            "channels": len(self.channels),
            "subscribers": len(self.subscriptions),
            "notifications": self.notifications,
            "connected": int(self.conn is not None and not self.conn.closed),
        }


def _enable_keepalive(conn: ServerConnection) -> None:
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), _KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), _KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), _KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), _USER_TIMEOUT_MS),
    ]
    for level, name, value in options:
        if name is None:
            continue  # not on this platform
        try:
            sock.setsockopt(level, name, value)
        except OSError as exc:
            log.debug("listener socket option %s not set: %s", name, exc)


def _listen_all(names: Iterable[str]) -> str:
    return "; ".join(f"LISTEN {quote_ident(n)}" for n in names)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    """Failures are reported to whoever awaits; never log them as 'never retrieved'."""
    if not fut.cancelled():
        fut.exception()
