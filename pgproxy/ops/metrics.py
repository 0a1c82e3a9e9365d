"""What ``/metrics`` shows: the Prometheus text exposition of this process, read from memory.

Owns the metric names and where each value comes from. Where the concept is PgBouncer's, the
name is the prometheus-community pgbouncer_exporter's (``pgbouncer_up``,
``pgbouncer_version_info``), so dashboards built for it work; what is ours is ``pgproxy_*``:
the listener of each upstream database (``pgproxy_listener_up``, ``..._channels``,
``..._subscribers``, ``pgproxy_notifications_received_total``). Pool and traffic families
follow the exporter's names once the admin console's snapshot exists to read them from.

Rule: a scrape only reads what the proxy counts anyway, builds the text from it and changes
nothing; no label per channel or per client (cardinality). With ``workers = N`` each scrape
reaches one worker and shows that worker's figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from pgproxy import version
from pgproxy.ops.host import OpsHost

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes


class _ProxyCollector:
    """A prometheus_client Collector over one proxy, read at each scrape."""

    def __init__(self, host: OpsHost) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pgbouncer_up", "The pooler answers.", value=1)
        info = GaugeMetricFamily(
            "pgbouncer_version_info", "The pooler's version.", labels=["version"]
        )
        info.add_metric([version()], 1)
        yield info
        yield from self._listeners()

    def _listeners(self) -> Iterator[Metric]:
        """Per upstream database name (summed over hosts serving the same name)."""
        labels = ["database"]
        up = GaugeMetricFamily(
            "pgproxy_listener_up", "The LISTEN connection is open (1) or not (0).", labels=labels
        )
        channels = GaugeMetricFamily(
            "pgproxy_listener_channels", "Channels LISTENed upstream.", labels=labels
        )
        subscribers = GaugeMetricFamily(
            "pgproxy_listener_subscribers", "Clients subscribed to a channel.", labels=labels
        )
        received = CounterMetricFamily(
            "pgproxy_notifications_received",
            "Notifications the listener received from upstream.",
            labels=labels,
        )
        readings: dict[str, list[dict[str, int]]] = {}
        for listener in self.host.listeners.values():
            readings.setdefault(listener.pool.upstream_db, []).append(listener.stats())
        for database, stats in sorted(readings.items()):
            up.add_metric([database], min(s["connected"] for s in stats))
            channels.add_metric([database], sum(s["channels"] for s in stats))
            subscribers.add_metric([database], sum(s["subscribers"] for s in stats))
            received.add_metric([database], sum(s["notifications"] for s in stats))
        yield from (up, channels, subscribers, received)


def render_metrics(host: OpsHost) -> bytes:
    """The exposition of ``host``'s metrics now (Prometheus text format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProxyCollector(host))
    return generate_latest(registry)
