"""The readings SHOW STATS' averages compare: each pool's counters, once per ``stats_period``.

Owns, per pool, the counters as they were at the last reading and how much they grew over the
period that reading closed. ``roll`` is called by a periodic task of the proxy (app.py) every
``stats_period`` seconds; the console reads ``of(pool)`` when it takes a snapshot. Averages
are the last complete period's, as PgBouncer's: a rate per second for counts and bytes, a
time per transaction, query or wait for times (``views`` divides; rates are kept here so that
several processes' snapshots add up, ``snapshot.merge``).

Rule: nothing on the hot path. Pools only ever increment their ``PoolStats``; this module reads
them once a period and keeps nothing per client or per transaction; a pool that is gone (a
reload retired it) is forgotten at the next reading.
"""

from __future__ import annotations

from collections.abc import Iterable

from pgproxy.pool.pool import Pool
from pgproxy.pool.stats import FIELDS

_ZERO = dict.fromkeys(FIELDS, 0)


class StatsPeriods:
    def __init__(self, now: float) -> None:
        self._read_at = now
        self._readings: dict[Pool, dict[str, int]] = {}
        self._increases: dict[Pool, dict[str, int]] = {}
        self._seconds = 0.0  # the length of the last complete period (0: none yet)

    def roll(self, pools: Iterable[Pool], now: float) -> None:
        """A period ends now: read every pool's counters, keep how much each grew."""
        readings: dict[Pool, dict[str, int]] = {}
        increases: dict[Pool, dict[str, int]] = {}
        for pool in pools:
            current = pool.stats.as_dict()
            before = self._readings.get(pool, _ZERO)  # a new pool started from zero
            readings[pool] = current
            increases[pool] = {name: current[name] - before[name] for name in FIELDS}
        self._readings, self._increases = readings, increases
        self._seconds, self._read_at = now - self._read_at, now

    def of(self, pool: Pool) -> tuple[dict[str, int], dict[str, float]]:
        """How much ``pool``'s counters grew over the last complete period, and per second."""
        increase = self._increases.get(pool)
        if increase is None or self._seconds <= 0:
            return dict(_ZERO), dict.fromkeys(FIELDS, 0.0)
        return dict(increase), {k: v / self._seconds for k, v in increase.items()}
