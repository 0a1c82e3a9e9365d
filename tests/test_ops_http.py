"""The operators' HTTP listener (``metrics_listen``): probes, metrics, and the HTTP itself.

Requests are written by hand on raw sockets, so malformed, oversized and slow ones can be sent
as a broken client would. Readiness is driven with a real upstream going away: the shared
cluster stopped and started, or a port nobody listens on until the test listens on it. With
``workers = 2`` the tests run pgproxy as real processes and tell the workers apart by the
``X-Pgproxy-Pid`` header and the pids the supervisor logs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy import version
from pgproxy.config import ConfigError, parse_config
from pgproxy.ops.httpd import LINGER, MAX_REQUEST, READ_TIMEOUT
from pgproxy.ops.service import MetricsListenError
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy, pg_server_url
from tests.support.process import ROOT, free_port
from tests.support.proxy_runner import ProxyThread
from tests.test_workers import WORKERS, supervisor

Reply = tuple[int, dict[str, str], bytes]


def http(port: int, request: bytes, timeout: float = 10) -> Reply:
    """Send ``request`` as it is; the status, headers (lower-case names) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # answered and closed before taking it all: read the answer
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("ascii").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


def get(port: int, path: str, method: str = "GET") -> Reply:
    return http(port, f"{method} {path} HTTP/1.1\r\nHost: pgproxy\r\n\r\n".encode())


def wait_status(port: int, path: str, status: int, timeout: float = 15, body: bytes = b"") -> Reply:
    """The first reply with ``status`` (and a body starting with ``body``)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = get(port, path)
        if reply[0] == status and reply[2].startswith(body):
            return reply
        assert time.monotonic() < deadline, f"{path} still answers {reply}"
        time.sleep(0.2)


def metrics_port(proxy: ProxyThread) -> int:
    return int(proxy.call(lambda p: p.ops.port))


@pytest.fixture
def ops(make_proxy: MakeProxy) -> ProxyThread:
    return make_proxy(proxy={"metrics_listen": "127.0.0.1:0"})


# --------------------------------------------------------------------------- configuration


def test_the_settings_are_checked() -> None:
    proxy = parse_config({}).proxy
    assert (proxy.metrics_listen, proxy.log_format, proxy.log_stats_period) == ("", "text", 60)
    assert parse_config({"proxy": {"metrics_listen": "[::1]:9127"}}).proxy.metrics_listen
    for key, value, message in [
        ("metrics_listen", "9127", "proxy.metrics_listen"),
        ("metrics_listen", 9127, "proxy.metrics_listen: must be a string"),
        ("log_format", "xml", "proxy.log_format: must be one of 'text', 'json'"),
        ("log_stats_period", -1, "proxy.log_stats_period: must be a finite number >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"proxy": {key: value}})


def test_no_listener_without_metrics_listen(proxy: ProxyThread) -> None:
    assert proxy.call(lambda p: p.ops.http) is None


# --------------------------------------------------------------------------- probes


def test_healthz_and_readyz_answer(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    status, headers, body = get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    assert headers["content-length"] == "3"
    assert headers["content-type"].startswith("text/plain")
    status, _, body = wait_status(port, "/readyz", 200)
    assert body == b"ok\n"
    assert get(port, "/readyz?verbose=1")[0] == 200  # a query string is ignored


def test_head_answers_the_headers_alone(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    status, headers, body = get(port, "/healthz", "HEAD")
    assert (status, headers["content-length"], body) == (200, "3", b"")
    wait_status(port, "/readyz", 200)
    status, headers, body = get(port, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_unknown_paths_and_other_methods_are_refused(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    assert get(port, "/nope")[0] == 404
    assert get(port, "/nope", "HEAD")[2] == b""
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = get(port, "/healthz", method)
        assert status == 405 and headers["allow"] == "GET, HEAD", method


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\n\r\n",
        b"get /healthz HTTP/1.1\r\n\r\n",
        b"GET /health z HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n folded: header\r\n\r\n",
        b"GET /h\xc3\xa9 HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
    ],
)
def test_a_bad_request_gets_400(ops: ProxyThread, request_bytes: bytes) -> None:
    assert http(metrics_port(ops), request_bytes)[0] == 400


def test_bare_line_feeds_and_a_leading_empty_line_are_accepted(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    assert http(port, b"GET /healthz HTTP/1.0\n\n")[0] == 200
    assert http(port, b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_a_huge_request_is_cut_off(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    header = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    huge = b"GET /healthz HTTP/1.1\r\n" + header * (4 * MAX_REQUEST // len(header))
    started = time.monotonic()
    status, _, body = http(port, huge)  # never finished: no blank line
    assert (status, body) == (431, b"request too large\n")
    assert time.monotonic() - started < READ_TIMEOUT + LINGER  # cut off, not timed out
    assert http(port, huge + b"\r\n")[0] == 431  # finished, but too late
    assert get(port, "/healthz")[0] == 200


def test_a_slow_request_times_out(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    started = time.monotonic()
    status, _, _ = http(port, b"GET /healthz HTTP/1.1\r\n", timeout=READ_TIMEOUT + 10)
    assert status == 408
    assert READ_TIMEOUT - 0.5 <= time.monotonic() - started < READ_TIMEOUT + 5


def test_a_flood_of_probes_opens_no_server(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    wait_status(port, "/readyz", 200)
    for _ in range(200):
        assert get(port, "/readyz")[0] == 200
    assert ops.call(lambda p: [pool.total for pool in p.pools.values()]) == []


def test_readyz_fails_while_the_upstream_is_down(ops: ProxyThread, pg: PgCluster) -> None:
    port = metrics_port(ops)
    wait_status(port, "/readyz", 200)
    pg.stop()
    try:
        reason = f"no upstream reachable: {pg.host}:{pg.port}: "
        wait_status(port, "/readyz", 503, body=reason.encode())
        assert get(port, "/healthz")[0] == 200  # alive all the same
    finally:
        pg.start()
    wait_status(port, "/readyz", 200)


def test_readyz_follows_a_port_that_opens(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="pgproxy")
    closed = free_port()
    proxy = make_proxy(
        proxy={"metrics_listen": "127.0.0.1:0"},
        databases={"*": {"url": f"postgresql://127.0.0.1:{closed}"}},
    )
    port = metrics_port(proxy)
    _, _, body = wait_status(port, "/readyz", 503, body=b"no upstream reachable: ")
    assert b"127.0.0.1:%d: " % closed in body
    with socket.create_server(("127.0.0.1", closed)):
        wait_status(port, "/readyz", 200)  # something answers there now
    changes = [r.getMessage() for r in caplog.records if getattr(r, "upstream", None)]
    assert changes[0].startswith(f"upstream 127.0.0.1:{closed} unreachable: ")
    assert changes[1] == f"upstream 127.0.0.1:{closed} reachable"


def test_readyz_fails_while_draining(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    wait_status(port, "/readyz", 200)
    with psycopg.connect(ops.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        # A drain, as SIGTERM starts one: readiness fails first, the idle client goes after.
        ops.call(lambda p: p.control.drain(5), timeout=30)
        assert get(port, "/readyz")[:3:2] == (503, b"draining\n")
        assert get(port, "/healthz")[0] == 200  # alive, only not ready
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")


# --------------------------------------------------------------------------- metrics


def _families(port: int) -> dict[str, Any]:
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _value(family: Any, sample: str, **labels: str) -> float:
    values = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    assert len(values) == 1, (sample, labels, family.samples)
    return float(values[0])


def test_metrics_parse_and_show_the_listener(ops: ProxyThread) -> None:
    port = metrics_port(ops)
    families = _families(port)
    assert _value(families["pgbouncer_up"], "pgbouncer_up") == 1
    assert _value(families["pgbouncer_version_info"], "pgbouncer_version_info", version=version())
    assert families["pgproxy_listener_up"].samples == []  # nobody listened yet

    conns = [psycopg.connect(ops.dsn(), autocommit=True) for _ in range(4)]
    try:
        for conn, channel in zip(conns, ["a", "a", "b"], strict=False):
            conn.execute(f"LISTEN {channel}")
        conns[3].execute("NOTIFY a, 'hello'")
        assert [n.payload for n in conns[0].notifies(timeout=10, stop_after=1)] == ["hello"]
        families = _families(port)
        labels = {"database": "postgres"}
        assert families["pgproxy_listener_up"].type == "gauge"
        assert _value(families["pgproxy_listener_up"], "pgproxy_listener_up", **labels) == 1
        channels = families["pgproxy_listener_channels"]
        assert _value(channels, "pgproxy_listener_channels", **labels) == 2
        subscribers = families["pgproxy_listener_subscribers"]
        assert _value(subscribers, "pgproxy_listener_subscribers", **labels) == 3
        received = families["pgproxy_notifications_received"]
        assert received.type == "counter"
        assert _value(received, "pgproxy_notifications_received_total", **labels) == 1
    finally:
        for conn in conns:
            conn.close()


# --------------------------------------------------------------------------- binding


def test_a_taken_metrics_port_fails_the_start(make_proxy: MakeProxy) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenError, match=f"127.0.0.1:{port} \\(proxy.metrics_listen"):
            make_proxy(proxy={"metrics_listen": f"127.0.0.1:{port}"})


def _config(tmp_path: Path, pg: PgCluster, extra: str) -> Path:
    path = tmp_path / "pgproxy.toml"
    path.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\n{extra}\n'
        f'[databases."*"]\nurl = "{pg_server_url(pg)}"\n'
    )
    return path


def test_a_taken_metrics_port_stops_the_process(pg: PgCluster, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = _config(tmp_path, pg, f'metrics_listen = "127.0.0.1:{port}"')
        for workers in ("1", "2"):
            done = subprocess.run(
                [sys.executable, "-m", "pgproxy", "--config", str(config), "--workers", workers],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            assert f"cannot listen on 127.0.0.1:{port} (proxy.metrics_listen)" in done.stderr


def test_workers_need_a_fixed_metrics_port(pg: PgCluster, tmp_path: Path) -> None:
    config = _config(tmp_path, pg, 'workers = 2\nmetrics_listen = "127.0.0.1:0"')
    done = subprocess.run(
        [sys.executable, "-m", "pgproxy", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "workers need a fixed port to share" in done.stderr


@pytest.fixture
def two_workers(pg: PgCluster, tmp_path: Path) -> Iterator[tuple[Any, int]]:
    port = free_port()
    with supervisor(tmp_path, pg, f'metrics_listen = "127.0.0.1:{port}"') as sup:
        yield sup, port


def test_both_workers_answer_on_one_metrics_port(two_workers: tuple[Any, int]) -> None:
    sup, port = two_workers
    answered: set[int] = set()
    for _ in range(200):
        status, headers, _ = get(port, "/healthz")
        assert status == 200
        answered.add(int(headers["x-pgproxy-pid"]))
        if len(answered) == WORKERS:
            break
    assert answered == set(sup.workers.values())
    for _ in range(4):
        wait_status(port, "/readyz", 200)
        assert "pgbouncer_up 1.0" in get(port, "/metrics")[2].decode()
