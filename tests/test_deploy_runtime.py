"""pgproxy as a container runs it, as real processes against the throwaway cluster: configured
by its environment alone, reloading a mounted ConfigMap when it changes, and probed by
``python -m pgproxy.healthcheck``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

from pgproxy.healthcheck import probe_http, probe_tcp
from pgproxy.testing.cluster import PgCluster
from tests.conftest import pg_server_url
from tests.support.configmap import publish
from tests.support.process import ROOT, clean_env, free_port, proxy_process
from tests.test_workers import WORKERS, _one_per_worker, supervisor


def _run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _eventually(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _serves(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_environment_alone_configures_a_serving_proxy(pg: PgCluster) -> None:
    port = free_port()
    env = clean_env(
        DATABASE_URLS=f"appdb={pg_server_url(pg)}/postgres,other={pg_server_url(pg)}/app",
        PGPROXY_LISTEN_PORT=str(port),
        PGPROXY_POOL_MODE="transaction",
        PGPROXY_DEFAULT_POOL_SIZE="1",
        PGPROXY_MAX_CLIENT_CONN="2",
        PGPROXY_LOG_LEVEL="warning",
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}"
    with proxy_process(None, port, env=env) as proc:
        with (
            psycopg.connect(f"{dsn}/appdb", autocommit=True) as listener,
            psycopg.connect(f"{dsn}/appdb", autocommit=True) as notifier,
        ):
            assert listener.execute("select current_database()").fetchone() == ("postgres",)
            # default_pool_size = 1: both clients run on the one server of the pool.
            pids = {c.execute("select pg_backend_pid()").fetchone() for c in (listener, notifier)}
            assert len(pids) == 1
            listener.execute("LISTEN deploy_env")
            notifier.execute("NOTIFY deploy_env, 'hello'")
            got = next(listener.notifies(timeout=10))
            assert (got.channel, got.payload) == ("deploy_env", "hello")
            # max_client_conn = 2: a third client is refused.
            with pytest.raises(psycopg.OperationalError, match="too many"):
                psycopg.connect(f"{dsn}/appdb", connect_timeout=5)
            healthy = _run("pgproxy.healthcheck", env=env)
            assert (healthy.returncode, healthy.stderr) == (0, "")
        with psycopg.connect(f"{dsn}/other") as conn:
            assert conn.execute("select current_database()").fetchone() == ("app",)
        with pytest.raises(psycopg.OperationalError, match='database "postgres" does not exist'):
            psycopg.connect(f"{dsn}/postgres")  # DATABASE_URLS has no "*"
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_database_url_alone_is_enough(pg: PgCluster) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=pg_server_url(pg), PGPROXY_LISTEN=f"127.0.0.1:{port}")
    with proxy_process(None, port, env=env):
        assert _serves(f"postgresql://postgres@127.0.0.1:{port}/app")


def test_a_bad_variable_stops_pgproxy_with_its_name() -> None:
    result = _run("pgproxy", "--check", env=clean_env(PGPROXY_MAX_CLIENT_CONN="lots"))
    assert result.returncode == 2
    assert result.stderr == (
        "pgproxy: config error: PGPROXY_MAX_CLIENT_CONN: must be an integer (got string 'lots')\n"
    )
    result = _run("pgproxy", env=clean_env(PGPROXY_LISTENER_LOSS="drop"))
    assert result.returncode == 2
    assert "PGPROXY_LISTENER_LOSS: must be one of 'disconnect', 'keep'" in result.stderr


def test_healthcheck_fails_where_nothing_listens() -> None:
    port = free_port()
    result = _run("pgproxy.healthcheck", env=clean_env(PGPROXY_LISTEN_PORT=str(port)))
    assert result.returncode == 1
    assert result.stderr.startswith(f"pgproxy unhealthy: cannot connect to 127.0.0.1:{port}: ")
    result = _run("pgproxy.healthcheck", env=clean_env(PGPROXY_LISTEN_PORT="x"))
    assert result.returncode == 1
    assert result.stderr.startswith("pgproxy unhealthy: config error: PGPROXY_LISTEN_PORT: ")


@contextmanager
def _http(status: dict[str, int]) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_http_probe_wants_200_from_healthz() -> None:
    with _http({"/healthz": 200, "/readyz": 503}) as port:
        assert probe_http("0.0.0.0", port) is None  # a wildcard address is probed on loopback
        assert probe_http("127.0.0.1", port, "/readyz") == (
            f"GET http://127.0.0.1:{port}/readyz: status 503"
        )
    assert (probe_http("127.0.0.1", port) or "").startswith(f"GET http://127.0.0.1:{port}/healthz")
    assert (probe_tcp("::", port) or "").startswith(f"cannot connect to :::{port}")


def _proxy_toml(port: int, pg: PgCluster, *names: str) -> str:
    text = f'[proxy]\nlisten = "127.0.0.1:{port}"\nconfig_watch_interval = 0.2\n'
    for name in names:
        text += f'[databases.{name}]\nurl = "{pg_server_url(pg)}/postgres"\n'
    return text


def test_a_changed_configmap_is_reloaded(pg: PgCluster, tmp_path: Path) -> None:
    port = free_port()
    mount = tmp_path / "etc-pgproxy"
    publish(mount, {"pgproxy.toml": _proxy_toml(port, pg, "main")})
    dsn = f"postgresql://postgres@127.0.0.1:{port}"
    env = clean_env(PGPROXY_CONFIG=str(mount / "pgproxy.toml"))  # as the image finds it
    with proxy_process(None, port, env=env) as proc:
        assert _serves(f"{dsn}/main")
        assert not _serves(f"{dsn}/alias")
        publish(mount, {"pgproxy.toml": _proxy_toml(port, pg, "main", "alias")})
        _eventually(lambda: _serves(f"{dsn}/alias"), "the new ConfigMap was not loaded")
        publish(mount, {"pgproxy.toml": "[proxy\n"})  # broken: logged, the running one kept
        time.sleep(1)
        assert _serves(f"{dsn}/alias")
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
    assert out.count("pgproxy.toml changed; reloading the configuration") == 2
    assert "reload failed, keeping the running configuration: " in out
    assert "invalid TOML" in out


def test_the_supervisor_watches_the_file_for_its_workers(pg: PgCluster, tmp_path: Path) -> None:
    with supervisor(tmp_path, pg, "config_watch_interval = 0.2") as sup:
        assert not _serves(sup.dsn("alias"))
        mark = sup.mark()
        with sup.config.open("a") as f:
            f.write(f'\n[databases.alias]\nurl = "{pg_server_url(pg)}/postgres"\n')
        sup.wait_for(r"\[supervisor\]: .*pgproxy\.toml changed; reloading", mark)
        for index in range(WORKERS):
            sup.wait_for(rf"\[worker {index}\]: configuration reloaded from", mark)
        for conn in _one_per_worker(sup, "alias").values():
            with conn:
                assert conn.execute("select current_database()").fetchone() == ("postgres",)
