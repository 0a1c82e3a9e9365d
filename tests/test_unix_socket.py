"""The unix-domain listening socket (``unix_socket_dir``): drivers, access rules, TLS, the file."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import trustme

from pgproxy.config import ConfigError, parse_config
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from pgproxy.unixsocket import UnixListener, socket_path
from tests.conftest import MakeProxy, build_config
from tests.support.proxy_runner import ProxyThread


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short on purpose: a socket path must fit in 107 bytes, and pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="pgx-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _unix_proxy(make_proxy: MakeProxy, sock_dir: Path, **proxy: Any) -> ProxyThread:
    return make_proxy(proxy={"unix_socket_dir": str(sock_dir), **proxy})


def _conninfo(proxy: ProxyThread, sock_dir: Path, **params: Any) -> str:
    extra = " ".join(f"{k}={v}" for k, v in params.items())
    return f"host={sock_dir} port={proxy.port} user=postgres dbname=postgres {extra}"


def test_psycopg_queries_and_gets_notifications_through_the_socket(
    make_proxy: MakeProxy, sock_dir: Path
) -> None:
    proxy = _unix_proxy(make_proxy, sock_dir)
    path = Path(socket_path(str(sock_dir), proxy.port))
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777  # the default, as PgBouncer's
    with (
        psycopg.connect(_conninfo(proxy, sock_dir), autocommit=True) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True) as publisher,  # over TCP
    ):
        assert listener.execute("select 1 + 1").fetchone() == (2,)
        listener.execute("listen over_unix")
        publisher.execute("notify over_unix, 'hello'")
        note = next(listener.notifies(timeout=10))
        assert (note.channel, note.payload) == ("over_unix", "hello")
        assert note.pid == publisher.info.backend_pid  # the publisher's virtual pid


def test_asyncpg_prepared_statements_through_the_socket(
    make_proxy: MakeProxy, sock_dir: Path
) -> None:
    proxy = _unix_proxy(make_proxy, sock_dir)

    async def run() -> list[int]:
        conn = await asyncpg.connect(
            host=str(sock_dir), port=proxy.port, user="postgres", database="postgres"
        )
        try:
            stmt = await conn.prepare("select $1::int * 2")
            return [await stmt.fetchval(i) for i in range(3)]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [0, 2, 4]


def test_the_socket_file_takes_the_configured_mode_and_goes_at_stop(
    make_proxy: MakeProxy, sock_dir: Path
) -> None:
    proxy = _unix_proxy(make_proxy, sock_dir, unix_socket_mode=0o700)
    path = Path(socket_path(str(sock_dir), proxy.port))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    proxy.stop()
    assert not path.exists()


def test_a_dead_servers_socket_is_replaced_a_live_one_is_not(sock_dir: Path) -> None:
    path = socket_path(str(sock_dir), 5999)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening: what a killed process leaves behind
    dead.close()
    live = UnixListener(str(sock_dir), 5999, 0o777)
    try:
        with pytest.raises(OSError, match=r"another pgproxy holds .*/\.s\.PGSQL\.5999\.lock"):
            UnixListener(str(sock_dir), 5999, 0o777)
        assert os.path.exists(path)  # not stolen
    finally:
        live.close()
    assert not os.path.exists(path)


def test_another_servers_socket_is_left_alone(sock_dir: Path) -> None:
    path = socket_path(str(sock_dir), 5999)
    with socket.socket(socket.AF_UNIX) as other:  # e.g. Postgres or PgBouncer, no lock
        other.bind(path)
        other.listen(1)
        with pytest.raises(OSError, match="another server is listening"):
            UnixListener(str(sock_dir), 5999, 0o777)
        assert os.path.exists(path)


def test_a_wedged_server_with_a_full_backlog_is_not_waited_for(sock_dir: Path) -> None:
    path = socket_path(str(sock_dir), 5999)
    with socket.socket(socket.AF_UNIX) as wedged:
        wedged.bind(path)
        wedged.listen(0)  # never accepts: its backlog fills up
        queued = []
        try:
            while True:  # until a connect would block
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                queued.append(client)
                client.connect(path)
        except BlockingIOError:
            pass
        try:
            with pytest.raises(OSError, match="another server is listening"):
                UnixListener(str(sock_dir), 5999, 0o777)
        finally:
            for client in queued:
                client.close()


def test_a_file_that_is_not_a_socket_is_never_removed(sock_dir: Path) -> None:
    path = Path(socket_path(str(sock_dir), 5999))
    path.write_text("precious")
    with pytest.raises(OSError, match="is not a socket"):
        UnixListener(str(sock_dir), 5999, 0o777)
    assert path.read_text() == "precious"


def test_a_replaced_socket_file_is_left_to_its_new_owner(sock_dir: Path) -> None:
    first = UnixListener(str(sock_dir), 5999, 0o777)
    os.unlink(first.path)  # e.g. an operator cleaned up, and another server took the name
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(first.path)
        first.close()
        assert os.path.exists(first.path)


def test_a_tcp_client_without_a_peer_name_is_not_taken_for_a_local_one(
    make_proxy: MakeProxy, sock_dir: Path
) -> None:
    # A TCP client that resets before the proxy sees it has no peer name; whether a client
    # came through the unix socket is told by the listener, never guessed from that.
    proxy = _unix_proxy(make_proxy, sock_dir)

    class NoPeer:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

        abort = close

    def check(p: Any) -> tuple[bool, str]:
        from pgproxy.client.session import ClientSession

        client = ClientSession(p)
        client.connection_made(NoPeer())  # type: ignore[arg-type]
        try:
            return client.local, client.peer
        finally:
            client.connection_lost(None)

    assert proxy.call(check) == (False, "[unknown]")


def test_a_path_longer_than_a_socket_address_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(OSError, match="too long"):
        UnixListener(str(deep), 6432, 0o777)


def test_unix_socket_mode_must_be_a_file_mode(pg: Any) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.unix_socket_mode: must be between 0 and 511"):
        parse_config(build_config(pg, {"unix_socket_mode": 0o1777}))


# --------------------------------------------------------------------------- access rules


def test_a_local_rule_admits_the_socket_and_not_tcp(make_proxy: MakeProxy, sock_dir: Path) -> None:
    proxy = make_proxy(
        proxy={"unix_socket_dir": str(sock_dir)},
        hba=[{"database": "all", "user": "all", "address": "local", "method": "trust"}],
    )
    with psycopg.connect(_conninfo(proxy, sock_dir)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(
        psycopg.OperationalError, match=r'no pgproxy \[\[hba\]\] rule for host "127'
    ):
        psycopg.connect(proxy.dsn())


def test_an_address_rule_does_not_admit_the_socket(make_proxy: MakeProxy, sock_dir: Path) -> None:
    proxy = make_proxy(
        proxy={"unix_socket_dir": str(sock_dir)},
        hba=[{"database": "all", "user": "all", "address": "127.0.0.0/8", "method": "trust"}],
    )
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match=r'rule for host "\[local\]"'):
        psycopg.connect(_conninfo(proxy, sock_dir))


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("certs")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    return {
        "client_tls_cert_file": str(d / "server.crt"),
        "client_tls_key_file": str(d / "server.key"),
    }


def _ssl_request_answer(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(path)
        raw.sendall(m.ssl_request())
        return raw.recv(1)


def test_tls_is_refused_over_the_socket_as_postgres_does(
    make_proxy: MakeProxy, sock_dir: Path, certs: dict[str, str]
) -> None:
    proxy = _unix_proxy(make_proxy, sock_dir, client_tls_mode="prefer", **certs)
    assert _ssl_request_answer(socket_path(str(sock_dir), proxy.port)) == b"N"


def test_require_admits_the_socket_without_tls(
    make_proxy: MakeProxy, sock_dir: Path, certs: dict[str, str]
) -> None:
    proxy = _unix_proxy(make_proxy, sock_dir, client_tls_mode="require", **certs)
    with psycopg.connect(_conninfo(proxy, sock_dir)) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(proxy.dsn(sslmode="disable"))  # TCP still needs it


def test_verify_full_refuses_the_socket(
    make_proxy: MakeProxy, sock_dir: Path, certs: dict[str, str]
) -> None:
    ca = trustme.CA()
    ca_file = sock_dir / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = _unix_proxy(
        make_proxy,
        sock_dir,
        client_tls_mode="verify-full",
        client_tls_ca_file=str(ca_file),
        **certs,
    )
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(_conninfo(proxy, sock_dir))


def test_a_reload_that_moves_the_socket_says_it_needs_a_restart(
    make_proxy: MakeProxy, sock_dir: Path, pg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = _unix_proxy(make_proxy, sock_dir)
    moved = parse_config(build_config(pg, {"unix_socket_dir": str(sock_dir / "elsewhere")}))
    with caplog.at_level("WARNING", logger="pgproxy"):
        proxy.call(lambda p: p.reload(moved))
    assert "proxy.unix_socket_dir takes effect when pgproxy restarts" in caplog.text
    # Still served where it was bound.
    with psycopg.connect(_conninfo(proxy, sock_dir)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# --------------------------------------------------------------------------- upstream


def _via_socket(pg: PgCluster) -> str:
    return f"postgresql:///postgres?host={pg.socket_dir}&port={pg.port}"


def test_the_upstream_can_be_a_unix_socket_directory(make_proxy: MakeProxy, pg: PgCluster) -> None:
    # server_tls_mode "require" holds there as in libpq: no TLS is tried on a unix socket.
    proxy = make_proxy(
        proxy={"server_tls_mode": "require"}, databases={"*": {"url": _via_socket(pg)}}
    )
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        psycopg.connect(proxy.dsn(), autocommit=True) as publisher,
    ):
        # client_addr is NULL for a backend whose client came through the unix socket.
        row = conn.execute(
            "select client_addr is null, ssl from pg_stat_activity a"
            " join pg_stat_ssl s using (pid) where pid = pg_backend_pid()"
        ).fetchone()
        assert row == (True, False)
        conn.execute("listen up_unix")  # the listener connection goes the same way
        publisher.execute("notify up_unix, 'ok'")
        note = next(conn.notifies(timeout=10))
        assert (note.channel, note.payload) == ("up_unix", "ok")


def test_a_cancel_reaches_a_unix_socket_upstream(make_proxy: MakeProxy, pg: PgCluster) -> None:
    proxy = make_proxy(databases={"*": {"url": _via_socket(pg)}})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:

        def cancel_soon() -> None:
            deadline = time.monotonic() + 10
            with psycopg.connect(pg.dsn(), autocommit=True) as watcher:
                while not watcher.execute(
                    "select 1 from pg_stat_activity where query like 'select pg_sleep(30)%'"
                ).fetchone():
                    assert time.monotonic() < deadline
                    time.sleep(0.02)  # polling Postgres' view: there is no event to wait on
            conn.cancel_safe()

        thread = threading.Thread(target=cancel_soon)
        thread.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        thread.join()


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("postgresql:///app?host=/run/postgresql", "/run/postgresql", 5432),
        ("postgresql://%2Frun%2FPostgres:5433/app", "/run/Postgres", 5433),  # case kept
    ],
)
def test_socket_directory_urls_parse_as_libpq_reads_them(url: str, host: str, port: int) -> None:
    config = parse_config({"databases": {"app": {"url": url}}})
    assert (config.databases["app"].host, config.databases["app"].port) == (host, port)
