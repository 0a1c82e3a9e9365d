"""The operators' side of one proxy process, started, reloaded and stopped with it.

Owns the HTTP listener of ``metrics_listen`` and its routes (``/healthz``: the event loop
answers; ``/readyz``: an upstream answers and the proxy is not draining, else 503 with the
reason; ``/metrics``), the upstream probe behind ``/readyz`` (running only with the
listener), and the periodic stats line (``log_stats_period``, with or without it). With
``workers = N`` every worker binds ``metrics_listen`` with ``SO_REUSEPORT``, as the listen
address, and the kernel hands each request to one of them; that worker's ``/metrics`` shows
the whole proxy (it gathers the others' snapshots: ``Proxy.gather_snapshot``).

Rule: ``pgproxy.app`` makes one per ``Proxy`` and calls ``start``, ``reload`` and ``stop``;
nothing here imports the app: the proxy is an :class:`~pgproxy.ops.host.OpsHost`.
"""

from __future__ import annotations

from collections.abc import Awaitable

from pgproxy.admin.snapshot import Snapshot
from pgproxy.config.values import parse_listen
from pgproxy.ops.host import OpsHost
from pgproxy.ops.httpd import HttpServer, Response
from pgproxy.ops.metrics import CONTENT_TYPE, render_metrics
from pgproxy.ops.readiness import UpstreamProbe
from pgproxy.ops.stats_log import StatsLog
from pgproxy.wire import log

__all__ = ["MetricsListenError", "Operations"]


class MetricsListenError(OSError):
    """``metrics_listen`` cannot be bound; the message names it."""


class Operations:
    def __init__(self, host: OpsHost) -> None:
        self.host = host
        self.probe = UpstreamProbe(host)
        self.stats_log = StatsLog(host)
        self.http: HttpServer | None = None

    async def start(self, reuse_port: bool) -> None:
        """Start what the configuration asks for; ``reuse_port``: this is one of N workers."""
        self.stats_log.start()
        listen = self.host.config.proxy.metrics_listen
        if not listen:
            return
        host, port = parse_listen(listen, "proxy.metrics_listen")
        http = HttpServer(
            {"/healthz": _healthz, "/readyz": self._readyz, "/metrics": self._metrics}
        )
        try:
            await http.start(host, port, reuse_port)
        except OSError as exc:
            raise MetricsListenError(
                exc.errno, f"cannot listen on {listen} (proxy.metrics_listen): {exc}"
            ) from exc
        self.http = http
        self.probe.start()
        log.info("pgproxy health and metrics on http://%s:%d", host, http.port)

    @property
    def port(self) -> int:
        """The port the HTTP listener is bound to (tests use port 0)."""
        assert self.http is not None
        return self.http.port

    def reload(self) -> None:
        """The configuration changed (metrics_listen takes effect at the next start)."""
        self.stats_log.start()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self.probe.stop()
        await self.stats_log.stop()

    def _readyz(self) -> Response:
        ready, why = self.probe.verdict()
        return Response(200 if ready else 503, (why + "\n").encode())

    def _metrics(self) -> Response | Awaitable[Response]:
        """The whole proxy's: with workers, the snapshots of all that answer in time."""
        if self.host.worker[1] == 1:
            return self._exposition(self.host.snapshot())
        return self._gathered_metrics()

    async def _gathered_metrics(self) -> Response:
        return self._exposition(await self.host.gather_snapshot())

    def _exposition(self, snapshot: Snapshot) -> Response:
        channels = self.host.config.proxy.metrics_channel_labels
        return Response(200, render_metrics(snapshot, channels), CONTENT_TYPE)


def _healthz() -> Response:
    return Response(200, b"ok\n")
