"""The operators' side of a pgproxy process: probes, metrics, logs.

* ``httpd``: a minimal HTTP/1.1 server (one bounded GET or HEAD per connection, answered from
  memory), which knows nothing of the proxy;
* ``readiness``: whether an upstream answers, refreshed by a task, never on a request's path;
* ``metrics``: the Prometheus exposition of what the proxy already counts;
* ``stats_log``: the periodic ``stats:`` log line (``log_stats_period``), as PgBouncer's;
* ``logs``: the log format (text or JSON lines) and level, at start and on SIGHUP;
* ``host``: what they read of the proxy (``OpsHost``), so none of them imports ``pgproxy.app``;
* ``service``: ``Operations``, their lifecycle beside the proxy's (``metrics_listen``).

Rule: ``pgproxy.app`` and ``pgproxy.serve`` import this package, never the reverse; every route
answers from memory, and nothing here runs on a client's or a server's hot path. This file
imports nothing.
"""
