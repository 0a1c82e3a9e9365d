"""Shared fixtures: one throwaway PostgreSQL cluster per session, in-process proxies.

Fixtures:

* ``pg`` (session): a started :class:`pgproxy.testing.cluster.PgCluster`
  (max_connections=100). Shared by every test: clean up what you create. A test may
  stop/restart it; if it is left stopped, it is started again after that test.
* ``make_proxy`` (function): ``make_proxy(proxy=None, databases=None, users=None,
  **sections) -> ProxyThread``; the given tables are shallow-merged over the defaults
  below. Every proxy made is stopped at teardown.
* ``proxy`` (function): ``make_proxy()`` with the defaults.

``PGPROXY_TEST_WORKERS=N`` (N > 1) makes ``make_proxy`` start a real ``pgproxy`` with
``workers = N`` (``tests/support/workers.py``) instead of the in-process proxy, for every test
not marked ``in_process`` (those poke the proxy's insides, and always get the in-process one):
``scripts/test`` runs the LISTEN tests that way too. Such a process is started once per
configuration and shared by the tests that ask for the same one in a row (starting N+1
Python processes per test would cost more than the tests; one runs at a time, so what Postgres
shows is that one's), so those tests close what they open.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pgproxy.testing.cluster import PgCluster
from tests.support.proxy_runner import ProxyThread
from tests.support.workers import WorkersProxy

TEST_WORKERS = int(os.environ.get("PGPROXY_TEST_WORKERS", "1"))  # see above

DEFAULT_PROXY: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "pool_mode": "transaction",
    "default_pool_size": 5,
    "query_wait_timeout": 10,
    "server_connect_timeout": 5,
}

MakeProxy = Callable[..., ProxyThread]


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster(settings={"max_connections": "100"})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(autouse=True)
def _pg_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """If a test stopped the shared cluster (e.g. failed mid-restart), start it again."""
    yield
    if "pg" in request.fixturenames:
        cluster: PgCluster = request.getfixturevalue("pg")
        if not cluster.is_running():
            cluster.start()


def pg_server_url(pg: PgCluster) -> str:
    """URL of the cluster without user or database (what the proxy's ``databases`` wants)."""
    return f"postgresql://{pg.host}:{pg.port}"


def build_config(
    pg: PgCluster,
    proxy: dict[str, Any] | None = None,
    databases: dict[str, Any] | None = None,
    users: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The TOML-shaped config dict ``make_proxy`` passes to ``parse_config``."""
    data: dict[str, Any] = {
        "proxy": {**DEFAULT_PROXY, **(proxy or {})},
        "databases": {"*": {"url": pg_server_url(pg)}, **(databases or {})},
    }
    if users is not None:
        data["users"] = dict(users)
    data.update(sections)
    return data


@pytest.fixture(scope="session")
def _worker_processes() -> Iterator[dict[str, WorkersProxy]]:
    """The multi-worker pgproxies started so far, by configuration (stopped at the end)."""
    running: dict[str, WorkersProxy] = {}
    yield running
    for process in running.values():
        process.stop()


@pytest.fixture
def make_proxy(
    pg: PgCluster, request: pytest.FixtureRequest, _worker_processes: dict[str, WorkersProxy]
) -> Iterator[MakeProxy]:
    made: list[ProxyThread] = []
    workers = 1 if request.node.get_closest_marker("in_process") else TEST_WORKERS

    def factory(
        proxy: dict[str, Any] | None = None,
        databases: dict[str, Any] | None = None,
        users: dict[str, Any] | None = None,
        **sections: Any,
    ) -> ProxyThread:
        from pgproxy.config import parse_config

        data = build_config(pg, proxy, databases, users, **sections)
        if workers > 1:
            key = repr(data)
            process = _worker_processes.get(key)
            for other in [k for k in _worker_processes if k != key]:
                _worker_processes.pop(other).stop()  # one at a time: its listeners only
            if process is None or not process.running:
                process = _worker_processes[key] = WorkersProxy(data, workers).start()
            return process  # type: ignore[return-value]  # ProxyThread's shape, not its type
        runner = ProxyThread(parse_config(data))
        made.append(runner)
        runner.start()
        return runner

    yield factory

    errors: list[BaseException] = []
    for runner in reversed(made):
        try:
            runner.stop()
        except BaseException as e:  # stop them all, then report
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def proxy(make_proxy: MakeProxy) -> ProxyThread:
    return make_proxy()
