"""How much login work one turn of the event loop may do: established clients first.

A login is a few steps (startup packet, each SASL message, the hand-off), each some tenths of
a millisecond of Python. In a storm a thousand logins have a message ready in the same turn,
and asyncio runs every step that became ready before it polls again, so one turn grew to
hundreds of milliseconds, and an established client's query, which is forwarded from the poll
itself, waited for all of them (issue 16: p99 39 ms, worst 85 ms).

:class:`LoginPacer` lets at most :data:`STEPS_PER_TURN` login steps run per turn; the others
wait, first come first served, for later turns. A turn with no login waiting costs nothing
extra, and a storm takes about as long as before: the same work, in more, shorter turns.

An accepted client's login starts the same way (:meth:`LoginPacer.admit`): the listening
socket hands over hundreds of connections in one turn when a storm begins, and starting
every login task there made that turn tens of milliseconds long.

While logins wait, the cyclic GC's full collections wait too (``pgproxy.gcpause``).

Rule: a login begins with ``pacer.admit()`` and each of its steps with ``await pacer.step()``
(``WireProtocol`` does it after each handshake read of a client); nothing else waits on the
pacer. One pacer per event loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from typing import Final

from pgproxy import gcpause

# ~0.1-0.3 ms each on a 2-core machine: a few milliseconds of login work per turn at most.
STEPS_PER_TURN: Final = 16


class LoginPacer:
    """At most ``per_turn`` steps granted per loop turn, in arrival order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int = STEPS_PER_TURN) -> None:
        self._loop = loop
        self._per_turn = per_turn
        self._left = per_turn  # steps still allowed before the next refill
        self._refill_due = False
        # What runs when its turn comes: a login's next step, or a login to start.
        self._waiting: deque[Callable[[], bool]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, start: Callable[[], bool]) -> None:
        """Run ``start`` (a login's first step) now if this turn has room, else in a later one.

        ``start`` returns False when it did nothing (the client left while it waited): then it
        takes no room."""
        if self._left > 0 and not self._waiting:
            if start():
                self._left -= 1
                self._schedule_refill()
            return
        self._waiting.append(start)
        self._schedule_refill()

    async def step(self) -> None:
        """Return when this login may do a step of work (at once while the turn has room)."""
        if self._left > 0 and not self._waiting:
            self._left -= 1
            self._schedule_refill()
            return
        fut = self._loop.create_future()
        self._waiting.append(lambda: _resume(fut))
        self._schedule_refill()
        await fut

    def _schedule_refill(self) -> None:
        # call_soon from inside a turn runs in the next one: the refill marks a turn boundary.
        if not self._refill_due:
            self._refill_due = True
            self._loop.call_soon(self._refill)

    def _refill(self) -> None:
        self._refill_due = False
        left = self._per_turn
        waiting = self._waiting
        while waiting and left > 0:
            if waiting.popleft()():
                left -= 1
        self._left = left
        if waiting:
            gcpause.hold()  # renewed every turn while logins wait
        if waiting or left < self._per_turn:
            self._schedule_refill()


def _resume(fut: asyncio.Future[None]) -> bool:
    if fut.done():  # its login was cancelled meanwhile
        return False
    fut.set_result(None)  # the step runs in the next turn
    return True


_pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoginPacer] = (
    weakref.WeakKeyDictionary()
)


def pacer() -> LoginPacer:
    """The running loop's pacer."""
    loop = asyncio.get_running_loop()
    found = _pacers.get(loop)
    if found is None:
        found = _pacers[loop] = LoginPacer(loop)
    return found
