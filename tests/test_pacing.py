"""Login pacing (pgproxy/pacing.py): at most so many login steps per loop turn, first come
first served, and the GC's full collections held off only while logins wait."""

from __future__ import annotations

import asyncio
import gc
import time

from pgproxy import gcpause, pacing


async def test_steps_are_spread_over_turns_in_arrival_order() -> None:
    loop = asyncio.get_running_loop()
    pacer = pacing.LoginPacer(loop, per_turn=4)
    turn = 0
    ran: list[tuple[int, int]] = []  # (turn, login)

    def count_turns() -> None:
        nonlocal turn
        turn += 1
        if len(ran) < 20:
            loop.call_soon(count_turns)

    async def login(i: int) -> None:
        await pacer.step()
        ran.append((turn, i))

    loop.call_soon(count_turns)
    await asyncio.gather(*(login(i) for i in range(20)))
    assert [i for _, i in ran] == list(range(20))  # first come, first served
    per_turn: dict[int, int] = {}
    for t, _ in ran:
        per_turn[t] = per_turn.get(t, 0) + 1
    assert max(per_turn.values()) <= 4 and len(per_turn) >= 5, per_turn


async def test_a_client_gone_before_its_turn_takes_no_room() -> None:
    pacer = pacing.LoginPacer(asyncio.get_running_loop(), per_turn=1)
    started: list[int] = []
    pacer.admit(lambda: started.append(0) is None)  # room: runs at once
    pacer.admit(lambda: False)  # left meanwhile
    done = asyncio.Event()
    pacer.admit(lambda: started.append(2) is None and done.set() is None)
    await done.wait()
    assert started == [0, 2]


def _no_hold() -> tuple[int, int, int]:
    """The thresholds once an earlier test's hold (renewed a moment ago) has ended."""
    if gcpause.holding():
        time.sleep(gcpause.QUIET * 1.2)
        gc.collect(0)
    assert not gcpause.holding()
    return gc.get_threshold()


async def test_full_collections_wait_while_logins_wait_and_come_back_after() -> None:
    before = _no_hold()
    pacer = pacing.LoginPacer(asyncio.get_running_loop(), per_turn=2)
    held: list[int] = []

    async def login() -> None:
        await pacer.step()
        held.append(gc.get_threshold()[2])

    await asyncio.gather(*(login() for _ in range(10)))
    assert gcpause.holding() and max(held) > before[2]  # held off during the storm
    await asyncio.sleep(gcpause.QUIET * 1.5)
    gc.collect(0)  # a young collection notices the quiet
    assert not gcpause.holding() and gc.get_threshold() == before


def test_a_hold_nobody_renews_ends_by_itself() -> None:
    before = _no_hold()
    gcpause.hold()
    assert gcpause.holding()
    time.sleep(gcpause.QUIET * 1.2)  # the holder went away (a closed loop): nobody renews
    gc.collect(0)
    assert not gcpause.holding() and gc.get_threshold() == before
