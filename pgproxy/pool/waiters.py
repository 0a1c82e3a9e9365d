"""Waiting for a server: one request per wait, and the helpers that complete them.

Owns :class:`ServerRequest` (a plain callback object, no Future: a server freed by a release is
delivered synchronously from inside it) and the small functions that finish requests and wake
operator commands waiting on a pool.

Rule: a request is completed exactly once (a result, an error, or a cancel); a server delivered
to a request that gave up goes back to its pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pgproxy.backend import ServerConnection
from pgproxy.wire import log

Deliver = Callable[["ServerConnection | None", "BaseException | None"], None]


class ServerRequest:
    """One wait for a server (see ``Pool.request``)."""

    __slots__ = ("_deliver", "deadline", "done", "started")

    def __init__(self, deliver: Deliver, deadline: float, started: float) -> None:
        self._deliver: Deliver | None = deliver
        self.deadline = deadline
        # When the wait began, on the loop's clock (monotonic, as ``time.monotonic``): the
        # pool's time, already read for the deadline, so a wait costs no clock reading more.
        self.started = started
        self.done = False

    def cancel(self) -> None:
        """Give up: nothing will be delivered (the pool skips it when its turn comes). The
        callback is dropped now, so a gone client is not kept alive by the queue."""
        self.done = True
        self._deliver = None

    def set_result(self, server: ServerConnection) -> None:
        deliver = self._deliver
        if self.done or deliver is None:  # cancelled meanwhile: the server goes back
            server.pool.release(server)
            return
        self.done, self._deliver = True, None
        try:
            deliver(server, None)
        except Exception:  # never let one client's bug break the releasing server's stream
            log.exception("delivering %r failed", server)

    def set_exception(self, error: BaseException) -> None:
        deliver = self._deliver
        if self.done or deliver is None:
            return
        self.done, self._deliver = True, None
        try:
            deliver(None, error)
        except Exception:
            log.exception("delivering an error to a pool waiter failed")


def chain(task: asyncio.Future[ServerConnection], req: ServerRequest) -> None:
    """Deliver a connect task's outcome to a waiter; if the waiter gave up, release the server."""

    def done(t: asyncio.Future[ServerConnection]) -> None:
        if t.cancelled():
            req.cancel()
            return
        exc = t.exception()
        if exc is not None:
            req.set_exception(exc)
        else:
            req.set_result(t.result())

    task.add_done_callback(done)


def wake(waiting: list[asyncio.Future[None]]) -> None:
    for fut in waiting:
        if not fut.done():
            fut.set_result(None)
    waiting.clear()
