"""The periodic stats line, as PgBouncer's ``log_stats``: every ``log_stats_period`` seconds, one
line per database with its rates and average times since the line before.

``stats for app: 120 xacts/s, 130 queries/s, in 5120 B/s, out 20480 B/s, xact 850 us, query
700 us, wait 3 us``, with the same figures as structured fields (SHOW STATS's ``avg_*`` names)
in JSON logs. Owns the previous reading of every pool's counters and the task that compares.

Rule: nothing on the hot path: once a period it reads the counters the pools keep anyway
(pool/stats.py) and computes with ``averages``; a pool made since the last line counts from
zero, one retired since then stops counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from pgproxy.ops.host import OpsHost
from pgproxy.pool.pool import Pool
from pgproxy.pool.stats import FIELDS, averages
from pgproxy.wire import log

__all__ = ["StatsLog"]

_ZERO: Final = dict.fromkeys(FIELDS, 0)
# The line's figures: (averages key, SHOW STATS name).
_SHOWN: Final = (
    ("xact_count", "avg_xact_count"),
    ("query_count", "avg_query_count"),
    ("bytes_received", "avg_recv"),
    ("bytes_sent", "avg_sent"),
    ("xact_time", "avg_xact_time"),
    ("query_time", "avg_query_time"),
    ("wait_time", "avg_wait_time"),
)
_LINE: Final = (
    "stats for %s: %d xacts/s, %d queries/s, in %d B/s, out %d B/s, "
    "xact %d us, query %d us, wait %d us"
)


class StatsLog:
    def __init__(self, host: OpsHost) -> None:
        self.host = host
        self.period = 0.0
        self._task: asyncio.Task[None] | None = None
        self._readings: dict[Pool, dict[str, int]] = {}
        self._at = 0.0

    def start(self) -> None:
        """(Re)start with the configured period, if it changed; 0 stops the lines."""
        period = self.host.config.proxy.log_stats_period
        if period == self.period and (self._task is not None) == (period > 0):
            return
        self._cancel()
        self.period = period
        if period > 0:
            self._readings, self._at = self._read(), time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(period))

    async def stop(self) -> None:
        task = self._cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _cancel(self) -> asyncio.Task[None] | None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def _run(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self.log_line()

    def _read(self) -> dict[Pool, dict[str, int]]:
        return {pool: pool.stats.as_dict() for pool in self.host.pools.values()}

    def log_line(self) -> None:
        """Log one line per database against the previous reading, and keep this one."""
        now = time.monotonic()
        seconds, self._at = now - self._at, now
        previous, self._readings = self._readings, self._read()
        new: dict[str, dict[str, int]] = {}
        old: dict[str, dict[str, int]] = {}
        for (database, _), pool in sorted(self.host.pools.items(), key=lambda item: item[0]):
            for totals, reading in ((new, self._readings[pool]), (old, previous.get(pool, _ZERO))):
                total = totals.setdefault(database, dict(_ZERO))
                for name in FIELDS:
                    total[name] += reading[name]
        for database, reading in new.items():
            avg = averages(reading, old[database], seconds)
            figures = [avg[key] for key, _ in _SHOWN]
            fields = {name: value for (_, name), value in zip(_SHOWN, figures, strict=True)}
            extra = {"event": "stats", "database": database, "period_s": round(seconds, 3)}
            log.info(_LINE, database, *figures, extra={**extra, **fields})
