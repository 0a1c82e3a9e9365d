"""TLS on both sides: clients to pgproxy, and pgproxy to Postgres."""

from __future__ import annotations

import gc
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy, pg_server_url
from tests.support.process import free_port, proxy_process
from tests.support.proxy_runner import ProxyThread


@pytest.fixture(autouse=True)
def _collect_failed_handshakes() -> Iterator[None]:
    """Failed TLS handshakes leave socket/SSL objects in reference cycles. Collect them now:
    CPython 3.11.7 raises "AST constructor recursion depth mismatch" if their finalizers run
    during a later compile() (pytest compiles lazily-imported modules at session end)."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("certs")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    trustme.CA().cert_pem.write_to_path(str(d / "other-ca.crt"))
    return {k: str(d / f) for k, f in [("cert", "server.crt"), ("key", "server.key"),
                                       ("ca", "ca.crt"), ("other_ca", "other-ca.crt")]}  # fmt: skip


def _tls_proxy(make_proxy: MakeProxy, certs: dict[str, str], mode: str) -> ProxyThread:
    return make_proxy(
        proxy={
            "client_tls_mode": mode,
            "client_tls_cert_file": certs["cert"],
            "client_tls_key_file": certs["key"],
        }
    )


def test_verify_full_client_connection(make_proxy: MakeProxy, certs: dict[str, str]) -> None:
    proxy = _tls_proxy(make_proxy, certs, "require")
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=certs["ca"])) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_require_mode_refuses_plaintext(make_proxy: MakeProxy, certs: dict[str, str]) -> None:
    proxy = _tls_proxy(make_proxy, certs, "require")
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(proxy.dsn(sslmode="disable"))


def test_a_wrong_ca_is_refused(make_proxy: MakeProxy, certs: dict[str, str]) -> None:
    proxy = _tls_proxy(make_proxy, certs, "prefer")
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(proxy.dsn(sslmode="verify-ca", sslrootcert=certs["other_ca"]))
    # prefer: plaintext still allowed
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use


def test_tls_garbage_after_s_leaves_the_proxy_serving(
    pg: PgCluster, certs: dict[str, str], tmp_path: Path
) -> None:
    # The proxy as a real process, as deployed: garbage instead of a TLS handshake.
    port = free_port()
    config = tmp_path / "pgproxy.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nclient_tls_mode = "require"\n'
        f'client_tls_cert_file = "{certs["cert"]}"\nclient_tls_key_file = "{certs["key"]}"\n'
        f'log_level = "warning"\n\n[databases."*"]\nurl = "{pg_server_url(pg)}"\n'
    )
    with proxy_process(config, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(m.ssl_request())
            assert sock.recv(1) == b"S"
            sock.sendall(b"\x16\x03\x01\x00\x05garbage-that-is-not-tls" * 10)
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=require"
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 2").fetchone() == (2,)


def test_plaintext_cancel_is_accepted_in_require_mode(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    import threading

    proxy = _tls_proxy(make_proxy, certs, "require")
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        timer.cancel()


def test_upstream_require_against_a_plaintext_server(make_proxy: MakeProxy) -> None:
    # Runs before ``tls_cluster`` switches the shared cluster's TLS on.
    proxy = make_proxy(proxy={"server_tls_mode": "require"})
    with pytest.raises(psycopg.OperationalError, match="does not support TLS"):
        psycopg.connect(proxy.dsn())


@pytest.fixture(scope="module")
def tls_cluster(pg: PgCluster, certs: dict[str, str]) -> Iterator[PgCluster]:
    """The shared cluster with ssl = on for this module (plaintext is still allowed)."""
    for name in ("cert", "key"):
        target = pg.data_dir / f"pgproxy-test-server.{name[:3]}"
        shutil.copy(certs[name], target)
        os.chmod(target, 0o600)
        if os.geteuid() == 0:
            shutil.chown(target, "postgres", "postgres")
    pg.psql(
        "alter system set ssl = on;"
        " alter system set ssl_cert_file = 'pgproxy-test-server.cer';"
        " alter system set ssl_key_file = 'pgproxy-test-server.key';"
        " select pg_reload_conf();"
    )
    try:
        yield pg
    finally:
        pg.psql(
            "alter system reset ssl; alter system reset ssl_cert_file;"
            " alter system reset ssl_key_file; select pg_reload_conf();"
        )


def _upstream_uses_tls(proxy: ProxyThread) -> bool:
    with psycopg.connect(proxy.dsn()) as conn:
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        return bool(row and row[0])


def test_upstream_verify_full(
    make_proxy: MakeProxy, tls_cluster: PgCluster, certs: dict[str, str]
) -> None:
    proxy = make_proxy(proxy={"server_tls_mode": "verify-full", "server_tls_ca_file": certs["ca"]})
    assert _upstream_uses_tls(proxy)


def test_upstream_sslmode_from_the_url(
    make_proxy: MakeProxy, tls_cluster: PgCluster, certs: dict[str, str]
) -> None:
    url = f"postgresql://127.0.0.1:{tls_cluster.port}?sslmode=disable"
    assert not _upstream_uses_tls(make_proxy(databases={"*": {"url": url}}))
    assert _upstream_uses_tls(make_proxy())  # the default, prefer


def test_upstream_with_a_wrong_ca_is_refused(
    make_proxy: MakeProxy, tls_cluster: PgCluster, certs: dict[str, str]
) -> None:
    proxy = make_proxy(
        proxy={"server_tls_mode": "verify-ca", "server_tls_ca_file": certs["other_ca"]}
    )
    with pytest.raises(psycopg.OperationalError, match="TLS handshake with upstream"):
        psycopg.connect(proxy.dsn())
