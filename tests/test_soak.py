"""A randomised mix of everything at once through a tiny pool: every result must be right.

Each client runs a seeded random sequence of: plain and parameterised queries, prepared
statements (psycopg prepares everything), transactions that commit or roll back, savepoints,
pipelines, session SETs, LISTEN/UNLISTEN, NOTIFY (own and others'), and errors. Every answer is
checked, and every listener must end up with exactly the notifications sent on its channels
after it subscribed.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import psycopg
import pytest
from psycopg import errors as pgerrors

from tests.conftest import MakeProxy

CLIENTS = 30
STEPS = 60
CHANNELS = ["soak_a", "soak_b", "soak_c"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1000, 2000])
def test_random_mixed_workload(make_proxy: MakeProxy, seed: int) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 3, "max_prepared_statements": 8})
    sent: dict[str, list[str]] = defaultdict(list)  # channel -> payloads, in commit order
    subscriptions: dict[int, dict[str, int]] = {}  # client -> channel -> index in sent[c]
    received: dict[int, list[tuple[str, str]]] = defaultdict(list)

    async def client(n: int) -> None:
        rng = random.Random(seed + n)
        conn = await psycopg.AsyncConnection.connect(
            proxy.dsn(), autocommit=True, prepare_threshold=rng.choice([0, 2, None])
        )
        me = subscriptions.setdefault(n, {})
        conn.add_notify_handler(lambda note: received[n].append((note.channel, note.payload)))
        row = await (await conn.execute("show TimeZone")).fetchone()
        assert row is not None
        timezone = row[0]
        try:
            for step in range(STEPS):
                op = rng.randrange(9)
                if op == 0:
                    v = rng.randrange(1000)
                    cur = await conn.execute("select %s::int * 3, %s::text", (v, f"c{n}"))
                    assert await cur.fetchone() == (v * 3, f"c{n}")
                elif op == 1:
                    async with conn.transaction():
                        await conn.execute("select 1")
                        async with conn.transaction():  # a savepoint
                            await conn.execute("select %s::int", (step,))
                elif op == 2:
                    with pytest.raises(pgerrors.DivisionByZero):
                        async with conn.transaction():
                            await conn.execute("select 1/0")
                elif op == 3:
                    async with conn.pipeline():
                        curs = [await conn.execute("select %s::int", (i,)) for i in range(5)]
                    assert [await c.fetchone() for c in curs] == [(i,) for i in range(5)]
                elif op == 4:
                    timezone = rng.choice(["UTC", "Asia/Tokyo", "Europe/Paris"])
                    await conn.execute(f"SET TimeZone = '{timezone}'")
                elif op == 5:
                    cur = await conn.execute("select current_setting('TimeZone')")
                    assert await cur.fetchone() == (timezone,)
                elif op == 6:
                    channel = rng.choice(CHANNELS)
                    if channel in me:
                        await conn.execute(f"UNLISTEN {channel}")
                        del me[channel]
                    else:
                        await conn.execute(f"LISTEN {channel}")
                        me[channel] = len(sent[channel])
                elif op == 7:
                    channel = rng.choice(CHANNELS)
                    payload = f"{n}:{step}"
                    # Sent on the pool; recorded in commit order (the await returns after it).
                    await conn.execute("select pg_notify(%s, %s)", (channel, payload))
                    sent[channel].append(payload)
                else:
                    async with conn.transaction(force_rollback=True):
                        await conn.execute("NOTIFY soak_a, 'rolled back'")
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    asyncio.run(main())
    assert sum(len(v) for v in sent.values()) > 50
    all_sent = {(c, p) for c, payloads in sent.items() for p in payloads}
    got_any = 0
    for n, notes in received.items():
        got_any += len(notes)
        assert ("soak_a", "rolled back") not in notes  # NOTIFY of a rolled-back transaction
        assert len(notes) == len(set(notes)), f"client {n} got duplicates"
        assert set(notes) <= all_sent, f"client {n} got something nobody sent"
        for channel in CHANNELS:  # one sender's order is kept on each channel
            per_sender: dict[str, list[int]] = defaultdict(list)
            for c, payload in notes:
                if c == channel:
                    sender, step = payload.split(":")
                    per_sender[sender].append(int(step))
            assert all(steps == sorted(steps) for steps in per_sender.values())
    assert got_any > 0
