"""The container's health probe: ``python -m pgproxy.healthcheck`` exits 0 when pgproxy answers.

Owns what the image's ``HEALTHCHECK`` runs (a slim image has no curl). The rule: it loads the
configuration exactly as ``pgproxy`` without arguments does (the file and the environment), so
it probes where the proxy really listens: with ``metrics_listen`` set, ``GET /healthz`` on it
must answer 200; otherwise a TCP connection to the client port must open. It logs nothing in
and sends no query: a probe must not disturb what it measures. Exit status 0 healthy, 1 not,
with the reason on stderr.
"""

from __future__ import annotations

import http.client
import socket
import sys

from pgproxy.config import ConfigError, load_config
from pgproxy.config.values import parse_listen

__all__ = ["main", "probe_http", "probe_tcp"]

TIMEOUT = 3.0
# Where a probe inside the container reaches a wildcard listen address.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def _reachable(host: str) -> str:
    return _LOOPBACK.get(host, host)


def probe_tcp(host: str, port: int, timeout: float = TIMEOUT) -> str | None:
    """None if a TCP connection to host:port opens, else why not."""
    try:
        socket.create_connection((_reachable(host), port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc}"
    return None


def probe_http(
    host: str, port: int, path: str = "/healthz", timeout: float = TIMEOUT
) -> str | None:
    """None if ``GET path`` on host:port answers 200, else why not."""
    conn = http.client.HTTPConnection(_reachable(host), port, timeout=timeout)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"GET http://{host}:{port}{path}: {exc}"
    finally:
        conn.close()
    return None if status == 200 else f"GET http://{host}:{port}{path}: status {status}"


def main() -> int:
    try:
        settings = load_config().proxy
        if settings.metrics_listen:
            problem = probe_http(*parse_listen(settings.metrics_listen, "metrics_listen"))
        else:
            problem = probe_tcp(settings.listen_host, settings.listen_port)
    except ConfigError as exc:
        problem = f"config error: {exc}"
    if problem is not None:
        print(f"pgproxy unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
