"""NOTIFY attribution across workers: the virtual PID a notification from another worker's
server carries.

In one process a client that may have notified maps its server's real PID to its virtual PID
until its listener fence ends (``Listener.fence``, PROTOCOL-NOTES 21-22). With ``workers = N``
the notification may be read by another worker's listener, which has no such mapping. So:

* Every pooled server is announced to the siblings when it opens (the pool awaits their
  acknowledgement before the server is first used, so a sibling knows the PID before any
  notification from it can arrive) and forgotten when it closes; a worker that starts asks its
  siblings for theirs.
* A listener that reads a notification from a sibling's server holds it, and every later one
  (order), and asks the owner which virtual PID holds that server now; the owner answers from
  its listeners' mappings (0: none, the real PID goes out, as one process does unmapped).
* The notifier keeps its mapping until its fence ends, and its fence also fences the siblings'
  listeners for that database: each runs its own listener fence and answers once everything it
  read before has been attributed and handed out. So the owner's answer is the client that
  held the server when it notified, and no later holder's.

Rule: every wait on a sibling is bounded (``ATTRIBUTION_TIMEOUT``); one that does not answer in
time costs that time, is logged, and what was held goes out with the real PID, never held for
ever. Only with workers does any of this run: without, ``Listener.siblings`` is None.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from pgproxy.backend import ServerConnection
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.pubsub.listener import Channel, Listener, Subscriber
from pgproxy.pubsub.registry import ListenerKey
from pgproxy.wire import log
from pgproxy.workers import peerwire
from pgproxy.workers.peers import Peers

ATTRIBUTION_TIMEOUT = 2.0  # a sibling's answer to an announcement or a question
FENCE_TIMEOUT = 2 * ATTRIBUTION_TIMEOUT  # its fence may include a question of its own
_ASK_MAX = 1024  # PIDs in one question (peerwire bounds it)


class _Held:
    """A listener's notifications waiting to be attributed, in the order they were read."""

    __slots__ = ("items", "read", "released", "task", "waiters")

    def __init__(self) -> None:
        self.items: deque[_Item] = deque()
        self.read = 0  # items ever held
        self.released = 0  # ... and handed out
        self.task: asyncio.Task[None] | None = None
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []  # (read count, until released)


class _Item:
    __slots__ = ("channel", "members", "message", "owner", "pid")

    def __init__(self, channel: Channel, message: bytes, pid: int, owner: int | None) -> None:
        self.channel = channel
        self.members = tuple(channel.members)  # who listened when it was read
        self.message = message  # a whole NotificationResponse
        self.pid = pid
        self.owner = owner  # the worker to ask, None once attributed

    def attribute(self, vpid: int) -> None:
        if vpid:
            self.message = self.message[:5] + vpid.to_bytes(4, "big") + self.message[9:]
        self.owner = None


class Siblings:
    """One worker's part in attribution: its servers, its questions, its answers."""

    def __init__(
        self,
        peers: Peers,
        listeners: Mapping[ListenerKey, Listener],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.peers = peers
        self.listeners = listeners  # the proxy's, by listener_key
        self.spawn = spawn
        self.own: set[peerwire.ServerKey] = set()  # this worker's servers
        self.owners: dict[peerwire.ServerKey, int] = {}  # the siblings' servers: whose
        self._held: dict[Listener, _Held] = {}

    # --- servers ---------------------------------------------------------------------------

    async def learn(self) -> None:
        """A worker that starts: learn the servers its siblings have open."""
        answers = await self.peers.servers(ATTRIBUTION_TIMEOUT)
        for index, servers in answers.items():
            if isinstance(servers, Exception):
                log.debug("worker %d's servers not learnt: %s", index, servers)
                continue
            for key in servers:
                self.owners[key] = index

    async def opened(self, server: ServerConnection) -> None:
        """A server of this worker opened: the siblings know it before it is used."""
        key = _key(server)
        self.own.add(key)
        self.owners.pop(key, None)
        try:
            answers = await self.peers.servers_changed(True, [key], ATTRIBUTION_TIMEOUT)
        except BaseException:
            self.own.discard(key)
            raise
        for index, answer in answers.items():
            if isinstance(answer, (FileNotFoundError, ConnectionRefusedError)):
                # Not running (starting, restarting): it asks for the servers when it starts.
                log.debug("worker %d not told of server %d: %s", index, server.pid, answer)
            elif answer is not None:
                log.warning("worker %d not told of server %d: %s", index, server.pid, answer)

    def closed(self, server: ServerConnection) -> None:
        key = _key(server)
        if key in self.own:
            self.own.discard(key)
            self.spawn(self.peers.servers_changed(False, [key], ATTRIBUTION_TIMEOUT))

    # --- the listener's side ---------------------------------------------------------------

    def holds(self, listener: Listener, channel: Channel, pid: int, body: bytes) -> bool:
        """Take a notification to hand out later (True): it comes from a sibling's server, or
        others wait before it; False: the listener hands it out as usual."""
        held = self._held.get(listener)
        vpid = listener.virtual_pid(pid)  # attributed here: as the mapping is now
        owner = None if vpid is not None else self.owners.get(_key_of(listener, pid))
        if held is None or not held.items:
            if owner is None:
                return False
            held = self._held.setdefault(listener, _Held())
        if vpid is not None:
            body = vpid.to_bytes(4, "big") + body[4:]
        held.items.append(_Item(channel, m.message(m.NOTIFICATION_RESPONSE, body), pid, owner))
        held.read += 1
        if held.task is None:
            held.task = asyncio.get_running_loop().create_task(self._attribute(listener, held))
        return True

    async def _attribute(self, listener: Listener, held: _Held) -> None:
        try:
            while True:
                self._hand_out(listener, held)
                asking: dict[int, set[int]] = {}
                for item in held.items:
                    if item.owner is not None:
                        asking.setdefault(item.owner, set()).add(item.pid)
                if not asking:
                    return
                owners = list(asking)
                answers = await asyncio.gather(
                    *(self._ask(listener, o, sorted(asking[o])[:_ASK_MAX]) for o in owners)
                )
                known = {
                    (o, pid): vpid for o, a in zip(owners, answers, strict=True) for pid, vpid in a
                }
                for item in list(held.items):
                    if item.owner is not None and (item.owner, item.pid) in known:
                        item.attribute(known[item.owner, item.pid])
        finally:
            held.task = None

    async def _ask(self, listener: Listener, owner: int, pids: list[int]) -> list[tuple[int, int]]:
        db = listener.pool.database
        try:
            vpids = await self.peers.who_holds(owner, db.host, db.port, pids, ATTRIBUTION_TIMEOUT)
        except (OSError, TimeoutError, m.ProtocolError) as exc:
            log.warning(
                "%r: worker %d did not say whose notifications these are (%s): "
                "they go out with the server's PID",
                listener,
                owner,
                exc or "no answer in time",
            )
            vpids = (0,) * len(pids)
        return list(zip(pids, vpids, strict=True))

    def _hand_out(self, listener: Listener, held: _Held) -> None:
        """Hand out the attributed notifications at the head, in order, one write a member."""
        collected: dict[Subscriber, list[bytes]] = {}
        items = held.items
        while items and items[0].owner is None:
            item = items.popleft()
            held.released += 1
            channel = item.channel
            for client in item.members:
                if client in channel.members:  # not since gone or unlistened
                    channel.delivered += 1
                    listener.delivered += 1
                    collected.setdefault(client, []).append(item.message)
        for client, messages in collected.items():
            client.notify(b"".join(messages))
        waiting = []
        for count, waiter in held.waiters:
            if held.released >= count:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((count, waiter))
        held.waiters = waiting

    async def drained(self, listener: Listener) -> None:
        """Until everything held so far has been handed out."""
        held = self._held.get(listener)
        if held is None or not held.items:
            return
        waiter = asyncio.get_running_loop().create_future()
        held.waiters.append((held.read, waiter))
        await waiter

    def lost(self, listener: Listener) -> None:
        """The listener connection died: what it read goes out now, before the loss is told."""
        held = self._held.get(listener)
        if held is None or not held.items:
            return
        for item in held.items:
            if item.owner is not None:
                item.attribute(0)
        self._hand_out(listener, held)

    async def fence(self, listener: Listener) -> None:
        """A fence after a possible NOTIFY: this worker's listener (if it listens) and every
        sibling's for the same database; a sibling that does not answer in time is logged."""
        db = listener.pool.database
        there = self.peers.fence(db.host, db.port, listener.pool.upstream_db, FENCE_TIMEOUT)
        if listener.channels:
            _, answers = await asyncio.gather(listener.sync(), there)
        else:
            answers = await there
        for index, answer in answers.items():
            if answer is not None:
                log.warning("%r: worker %d's listener fence failed: %s", listener, index, answer)

    # --- answering the siblings (PeerHost.attribution) -------------------------------------

    async def answer(self, request: peerwire.Attribution) -> peerwire.Answer:
        if isinstance(request, peerwire.ServersChanged):
            for key in request.servers:
                if request.opened:
                    self.owners[key] = request.worker
                elif self.owners.get(key) == request.worker:
                    del self.owners[key]
            return None
        if isinstance(request, peerwire.ServersAsked):  # a worker (re)started: its
            # predecessor's servers died with it, closed or not
            for key in [k for k, owner in self.owners.items() if owner == request.worker]:
                del self.owners[key]
            return list(self.own)
        if isinstance(request, peerwire.WhoHolds):
            return [self._holder(request.host, request.port, pid) for pid in request.pids]
        listener = self._listener(request.host, request.port, request.dbname)
        conn = listener.conn if listener is not None else None
        if listener is not None and listener.channels and conn is not None and not conn.closed:
            try:
                await listener.sync()
            except (PgError, ConnectionError) as exc:
                log.debug("%r: fence for another worker: %s", listener, exc)
        return None

    def _listener(self, host: str, port: int, dbname: str) -> Listener | None:
        """The listener of the database whose first host is ``host:port`` (workers name a
        database by it: they share one configuration)."""
        for (hosts, upstream_db), listener in self.listeners.items():
            if upstream_db == dbname and hosts[0] == (host, port):
                return listener
        return None

    def _holder(self, host: str, port: int, pid: int) -> int:
        for listener in self.listeners.values():
            db = listener.pool.database
            if db.host == host and db.port == port:
                vpid = listener.virtual_pid(pid)
                if vpid is not None:
                    return vpid
        return 0


def _key(server: ServerConnection) -> peerwire.ServerKey:
    """A server by the host it is on (with several hosts, not always the first) and PID."""
    host, port = server.address
    return (host, port, server.pid)


def _key_of(listener: Listener, pid: int) -> peerwire.ServerKey:
    """The server ``pid`` names for ``listener``: a backend of the host it is connected to."""
    conn = listener.conn
    host, port = conn.address if conn is not None else listener.pool.database.hosts[0]
    return (host, port, pid)
