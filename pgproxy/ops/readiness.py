"""Whether this proxy should get new clients: an upstream answers and it is not draining.

Owns the reachability of the configured upstreams, kept in memory and refreshed every
``PROBE_INTERVAL`` seconds by a task of its own: a plain connect to each distinct upstream
host:port (TCP, or the unix socket of a socket-directory host), closed at once without a byte
(Postgres logs nothing for that), within ``PROBE_TIMEOUT``. A server login to an upstream
since the last round counts as a success and saves the connect.

Rule: the answer (``verdict``) reads memory only; nothing on a request's path connects or
waits, so a flood of probes cannot become a flood of connections to Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from pgproxy.ops.host import OpsHost
from pgproxy.unixsocket import open_upstream
from pgproxy.wire import log

__all__ = ["PROBE_INTERVAL", "UpstreamProbe"]

PROBE_INTERVAL: Final = 2.0
PROBE_TIMEOUT: Final = 1.0
_REASON_MAX: Final = 400  # characters of a 503's reason

Upstream = tuple[str, int]


class UpstreamProbe:
    """The last known reachability of every configured upstream."""

    def __init__(self, host: OpsHost) -> None:
        self.host = host
        # Upstream -> None (answered) or why not; None before the first round.
        self.results: dict[Upstream, str | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def verdict(self) -> tuple[bool, str]:
        """(ready, why): ready while not draining and at least one upstream answers."""
        if self.host.draining:
            return False, "draining"
        results = self.results
        if results is None:
            return False, "upstreams not checked yet"
        if any(error is None for error in results.values()):
            return True, "ok"
        if not results:
            return False, "no upstream configured"
        failures = "; ".join(f"{_name(up)}: {error}" for up, error in sorted(results.items()))
        return False, f"no upstream reachable: {failures}"[:_REASON_MAX]

    async def _run(self) -> None:
        while True:
            try:
                await self.probe()
            except Exception:  # never let one bad round end readiness for good
                log.exception("upstream probe failed")
            await asyncio.sleep(PROBE_INTERVAL)

    async def probe(self) -> None:
        """One round: every upstream in the configuration, in parallel."""
        upstreams = sorted({(db.host, db.port) for db in self.host.config.databases.values()})
        since = time.monotonic() - PROBE_INTERVAL
        pools = [*self.host.pools.values(), *(li.pool for li in self.host.listeners.values())]
        logged_in = {(p.database.host, p.database.port) for p in pools if p.last_login > since}
        checks = [_reach(up) for up in upstreams if up not in logged_in]
        errors = iter(await asyncio.gather(*checks))
        results = {up: None if up in logged_in else next(errors) for up in upstreams}
        previous, self.results = self.results, results
        for up, error in results.items():
            # A change is news; on the first round (and for a new upstream) only a failure.
            was_up = previous is None or previous.get(up) is None
            if (error is None) != was_up:
                state = "reachable" if error is None else f"unreachable: {error}"
                event = "upstream_reachable" if error is None else "upstream_unreachable"
                fields = {"event": event, "upstream": _name(up), "reason": error}
                log.info("upstream %s %s", _name(up), state, extra=fields)


async def _reach(upstream: Upstream) -> str | None:
    """None if ``upstream`` accepts a connection within PROBE_TIMEOUT, else why not."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await open_upstream(*upstream)
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    writer.close()
    return None


def _name(upstream: Upstream) -> str:
    host, port = upstream
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
