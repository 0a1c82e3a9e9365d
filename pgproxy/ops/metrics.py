"""What ``/metrics`` shows: the Prometheus text exposition of a snapshot (the whole proxy's).

Owns the metric names and where each value comes from. Where PgBouncer has the concept, the
name, labels and unit are the prometheus-community pgbouncer_exporter's as it reads them from
PgBouncer's console, so its dashboards and alerts work unchanged: ``pgbouncer_pools_*``
(SHOW POOLS, labels database and user), ``pgbouncer_stats_totals_*`` (SHOW STATS_TOTALS,
label database; times in seconds), ``pgbouncer_databases_*`` (SHOW DATABASES), the SHOW
LISTS gauges (``pgbouncer_used_clients``, ...) and ``pgbouncer_client_connections`` (SHOW
CLIENTS counted by database, user, application_name and state). What is ours is
``pgproxy_*``: per upstream database, its listener connections (up, channels, subscribers,
reconnects) and notifications (received, delivered, dropped, slow consumers cut off); the
workers there are and those whose figures these are; per channel only if
``metrics_channel_labels`` asks for it.

Rule: a pure function of a :class:`~pgproxy.admin.snapshot.Snapshot`, read through the
console's own tables (``views.TABLES``), so /metrics and SHOW never disagree; nothing is
counted for it. No label per client; a label per channel (unbounded: channel names are the
applications') only when asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from pgproxy.admin.snapshot import Snapshot
from pgproxy.admin.views import TABLES, Value

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
_US: Final = 1_000_000  # the console's µs in a second (the exporter's unit)

# (metric, console column, help): SHOW POOLS' gauges, labels database and user.
_POOLS: Final = (
    ("client_active_connections", "cl_active", "Clients linked to a server or idle."),
    ("client_waiting_connections", "cl_waiting", "Clients waiting for a server."),
    ("client_active_cancel_connections", "cl_active_cancel_req",
     "Clients whose cancel request was forwarded."),
    ("client_waiting_cancel_connections", "cl_waiting_cancel_req",
     "Clients whose cancel request waits to be forwarded."),
    ("server_active_connections", "sv_active", "Servers linked to a client."),
    ("server_active_cancel_connections", "sv_active_cancel", "Servers sending a cancel."),
    ("server_being_canceled_connections", "sv_being_canceled",
     "Servers waiting for cancels in flight."),
    ("server_idle_connections", "sv_idle", "Servers idle, ready for a client."),
    ("server_used_connections", "sv_used", "Servers idle, to be checked before use."),
    ("server_testing_connections", "sv_tested", "Servers being reset or checked."),
    ("server_login_connections", "sv_login", "Servers logging in."),
)  # fmt: skip
# (metric, console column, help, divisor): SHOW STATS_TOTALS' counters, label database.
_STATS: Final = (
    ("server_assignments_total", "server_assignment_count",
     "Times a client was given a server.", 1),
    ("sql_transactions_pooled_total", "xact_count", "SQL transactions pooled.", 1),
    ("queries_pooled_total", "query_count", "SQL queries pooled.", 1),
    ("received_bytes_total", "bytes_received", "Bytes received from clients.", 1),
    ("sent_bytes_total", "bytes_sent", "Bytes sent to clients.", 1),
    ("server_in_transaction_seconds_total", "xact_time",
     "Seconds servers spent in a transaction with a client.", _US),
    ("queries_duration_seconds_total", "query_time",
     "Seconds servers spent running clients' queries.", _US),
    ("client_wait_seconds_total", "wait_time", "Seconds clients waited for a server.", _US),
    ("client_parses_total", "client_parse_count", "Parse messages from clients.", 1),
    ("server_parses_total", "server_parse_count", "Parse messages sent to servers.", 1),
    ("binds_total", "bind_count", "Bind messages of prepared statements.", 1),
)  # fmt: skip
# (metric, console column, help): SHOW DATABASES' gauges.
_DATABASES: Final = (
    ("pool_size", "pool_size", "Server connections a pool may have."),
    ("min_pool_size", "min_pool_size", "Server connections a pool keeps open."),
    ("reserve_pool", "reserve_pool_size", "Additional server connections a pool may have."),
    ("max_connections", "max_connections", "Server connections allowed (0: no limit)."),
    ("current_connections", "current_connections", "Server connections open."),
    ("current_client_connections", "current_client_connections", "Clients logged in."),
    ("paused", "paused", "1 if the database is paused."),
    ("disabled", "disabled", "1 if the database is disabled."),
)
_DATABASE_LABELS: Final = ("name", "host", "port", "database", "force_user", "pool_mode")
# SHOW LISTS rows shown as the exporter's gauges of the same name.
_LISTS: Final = (
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers",
)  # fmt: skip
# (metric, SHOW LISTENERS column, help): per upstream database, added over its connections.
_LISTENERS: Final = (
    ("pgproxy_listener_channels", "channels", "Channels LISTENed upstream.", False),
    ("pgproxy_listener_subscribers", "subscribers", "Clients subscribed to a channel.", False),
    ("pgproxy_listener_reconnects_total", "reconnects",
     "Times a lost listener connection was made again.", True),
    ("pgproxy_notifications_received_total", "notifications_received",
     "Notifications the listeners received from upstream.", True),
    ("pgproxy_notifications_delivered_total", "notifications_delivered",
     "Notifications handed to subscribers (one per subscriber).", True),
    ("pgproxy_notifications_dropped_total", "notifications_dropped",
     "Notifications handed to a subscriber that never reached it (held during a transaction "
     "and discarded, or a slow consumer's when it was cut off).", True),
    ("pgproxy_slow_consumer_disconnects_total", "slow_consumer_disconnects",
     "Subscribers disconnected for not reading their notifications.", True),
)  # fmt: skip
_UP_STATES: Final = frozenset(("listening", "connected"))


def _rows(snapshot: Snapshot, table: str) -> list[dict[str, Value]]:
    """A SHOW table's rows as the console answers them, by column name."""
    shown = TABLES[table]
    names = [c.name for c in shown.columns]
    return [dict(zip(names, row, strict=True)) for row in shown.rows(snapshot)]


def _number(value: Value) -> float:
    return float(value) if isinstance(value, int) else 0.0


def _label(value: Value) -> str:
    return "" if value is None else str(value)


def _family(
    name: str, help_text: str, labels: tuple[str, ...], counter: bool = False
) -> GaugeMetricFamily | CounterMetricFamily:
    kind = CounterMetricFamily if counter else GaugeMetricFamily
    return kind(name, help_text, labels=list(labels))


class _SnapshotCollector:
    """A prometheus_client Collector over one snapshot."""

    def __init__(self, snapshot: Snapshot, channel_labels: bool) -> None:
        self.snapshot = snapshot
        self.channel_labels = channel_labels

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily("pgbouncer_up", "The pooler answers.", value=1)
        info = _family("pgbouncer_version_info", "The pooler's version.", ("version",))
        info.add_metric([snap["version"]], 1)
        yield info
        yield from self._pools()
        yield from self._stats()
        yield from self._databases()
        lists = {row["list"]: row["items"] for row in _rows(snap, "lists")}
        for name in _LISTS:
            yield GaugeMetricFamily(f"pgbouncer_{name}", f"SHOW LISTS: {name}.",
                                    value=_number(lists.get(name)))  # fmt: skip
        yield self._clients()
        yield GaugeMetricFamily("pgproxy_workers", "Worker processes (1: no workers).",
                                value=snap["workers"])  # fmt: skip
        yield GaugeMetricFamily(
            "pgproxy_workers_answering",
            "Worker processes whose figures these are (the others did not answer in time).",
            value=snap["processes"],
        )
        yield from self._listeners()
        if self.channel_labels:
            yield from self._channels()

    def _pools(self) -> Iterator[Metric]:
        labels = ("database", "user")
        rows = _rows(self.snapshot, "pools")
        for metric, column, help_text in _POOLS:
            family = _family(f"pgbouncer_pools_{metric}", help_text, labels)
            for row in rows:
                family.add_metric([_label(row["database"]), _label(row["user"])],
                                  _number(row[column]))  # fmt: skip
            yield family
        maxwait = _family("pgbouncer_pools_client_maxwait_seconds",
                          "How long the oldest waiting client has waited.", labels)  # fmt: skip
        for row in rows:
            seconds = _number(row["maxwait"]) + _number(row["maxwait_us"]) / _US
            maxwait.add_metric([_label(row["database"]), _label(row["user"])], seconds)
        yield maxwait

    def _stats(self) -> Iterator[Metric]:
        rows = _rows(self.snapshot, "stats_totals")
        for metric, column, help_text, divisor in _STATS:
            name = f"pgbouncer_stats_totals_{metric}"
            family = _family(name, help_text, ("database",), counter=True)
            for row in rows:
                family.add_metric([_label(row["database"])], _number(row[column]) / divisor)
            yield family

    def _databases(self) -> Iterator[Metric]:
        rows = _rows(self.snapshot, "databases")
        for metric, column, help_text in _DATABASES:
            family = _family(f"pgbouncer_databases_{metric}", help_text, _DATABASE_LABELS)
            for row in rows:
                family.add_metric([_label(row[k]) for k in _DATABASE_LABELS], _number(row[column]))
            yield family

    def _clients(self) -> Metric:
        labels = ("database", "user", "application_name", "state")
        help_text = "Clients by database, user, application_name and state."
        family = _family("pgbouncer_client_connections", help_text, labels)
        counts = Counter(
            (c["database"], c["user"], c["application_name"], c["state"])
            for c in self.snapshot["clients"]
        )
        for key, count in sorted(counts.items()):
            family.add_metric(list(key), count)
        return family

    def _listeners(self) -> Iterator[Metric]:
        """Per upstream database: its listener connections (one per worker and host) added
        up; up only if every one of them is."""
        by_database: dict[str, list[dict[str, Value]]] = {}
        for row in _rows(self.snapshot, "listeners"):
            by_database.setdefault(_label(row["database"]), []).append(row)
        up = _family("pgproxy_listener_up", "Every LISTEN connection is open (1) or not (0).",
                     ("database",))  # fmt: skip
        for database, rows in sorted(by_database.items()):
            up.add_metric([database], min(int(r["state"] in _UP_STATES) for r in rows))
        yield up
        for metric, column, help_text, counter in _LISTENERS:
            family = _family(metric, help_text, ("database",), counter)
            for database, rows in sorted(by_database.items()):
                family.add_metric([database], sum(_number(r[column]) for r in rows))
            yield family

    def _channels(self) -> Iterator[Metric]:
        labels = ("database", "channel")
        rows = _rows(self.snapshot, "channels")
        for metric, column, help_text, counter in (
            ("pgproxy_channel_subscribers", "subscribers", "Clients LISTENing.", False),
            ("pgproxy_channel_notifications_received_total", "notifications_received",
             "Notifications received while it had subscribers.", True),
            ("pgproxy_channel_notifications_delivered_total", "notifications_delivered",
             "Notifications handed to its subscribers.", True),
        ):  # fmt: skip
            family = _family(metric, help_text, labels, counter)
            for row in rows:
                family.add_metric([_label(row["database"]), _label(row["channel"])],
                                  _number(row[column]))  # fmt: skip
            yield family


def render_metrics(snapshot: Snapshot, channel_labels: bool = False) -> bytes:
    """The exposition of ``snapshot`` (Prometheus text format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, channel_labels))
    return generate_latest(registry)
