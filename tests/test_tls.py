"""TLS on both sides: clients to pgproxy, and pgproxy to Postgres."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import ssl
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


def _tls_proxy(
    make_proxy: MakeProxy,
    certs: dict[str, str],
    mode: str,
    auth_type: str = "trust",
    password: str | None = None,
) -> ProxyThread:
    return make_proxy(
        proxy={
            "client_tls_mode": mode,
            "client_tls_cert_file": certs["cert"],
            "client_tls_key_file": certs["key"],
            "auth_type": auth_type,
        },
        users=None if password is None else {"postgres": {"password": password}},
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


def test_tls_on_both_sides_to_a_postgres_that_requires_it(
    make_proxy: MakeProxy, tls_cluster: PgCluster, certs: dict[str, str]
) -> None:
    """psycopg verify-full -> pgproxy -> Postgres whose pg_hba allows TLS connections only."""
    hba = tls_cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("hostnossl all all 127.0.0.1/32 reject\n" + original)
    tls_cluster.psql("select pg_reload_conf()")
    try:
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(tls_cluster.dsn() + "?sslmode=disable")  # Postgres demands TLS
        proxy = make_proxy(
            proxy={
                "client_tls_mode": "require",
                "client_tls_cert_file": certs["cert"],
                "client_tls_key_file": certs["key"],
                "server_tls_mode": "verify-full",
                "server_tls_ca_file": certs["ca"],
            }
        )
        dsn = proxy.dsn(sslmode="verify-full", sslrootcert=certs["ca"])
        with psycopg.connect(dsn) as conn:
            assert conn.pgconn.ssl_in_use
            row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
        plain_upstream = make_proxy(proxy={"server_tls_mode": "disable"})
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(plain_upstream.dsn())
    finally:
        hba.write_text(original)
        tls_cluster.psql("select pg_reload_conf()")


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


# --- SCRAM-SHA-256-PLUS (tls-server-end-point channel binding) ----------------------------------


def _scram_tls_proxy(make_proxy: MakeProxy, certs: dict[str, str], mode: str) -> ProxyThread:
    # upstream: trust for postgres
    return _tls_proxy(make_proxy, certs, mode, auth_type="scram-sha-256", password="pw")


def test_channel_binding_required_by_the_client_works(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    proxy = _scram_tls_proxy(make_proxy, certs, "require")
    dsn = proxy.dsn(password="pw", sslmode="verify-full", sslrootcert=certs["ca"])
    with psycopg.connect(dsn + "&channel_binding=require", connect_timeout=5) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            proxy.dsn(password="wrong", sslmode="require", channel_binding="require"),
            connect_timeout=5,
        )


def test_plus_is_offered_only_over_tls(make_proxy: MakeProxy, certs: dict[str, str]) -> None:
    proxy = _scram_tls_proxy(make_proxy, certs, "prefer")
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(
            proxy.dsn(password="pw", sslmode="disable", channel_binding="require"),
            connect_timeout=5,
        )
    with psycopg.connect(proxy.dsn(password="pw", sslmode="disable"), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_certificate_hash_follows_rfc5929(certs: dict[str, str], tmp_path: Path) -> None:
    import datetime
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    from pgproxy.auth import cbind

    def self_signed(key: object, algorithm: hashes.HashAlgorithm | None) -> bytes:
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)  # type: ignore[attr-defined]
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, algorithm)  # type: ignore[arg-type]
        )  # fmt: skip
        return cert.public_bytes(serialization.Encoding.DER)

    ec_key = ec.generate_private_key(ec.SECP256R1())
    for algorithm, expected in [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
    ]:
        der = self_signed(ec_key, algorithm)
        assert cbind.certificate_hash(der) == hashlib.new(expected, der).digest()
    # SHA-1 (and MD5) are replaced by SHA-256. cryptography no longer signs with SHA-1, so an
    # RSA/SHA-384 certificate's OID is turned into sha1WithRSAEncryption (same length).
    der = self_signed(rsa.generate_private_key(65537, 2048), hashes.SHA384())
    sha384_rsa, sha1_rsa = bytes.fromhex("2a864886f70d01010c"), bytes.fromhex("2a864886f70d010105")
    assert cbind.certificate_hash(der) == hashlib.sha384(der).digest()
    der = der.replace(sha384_rsa, sha1_rsa)
    assert cbind.certificate_hash(der) == hashlib.sha256(der).digest()
    # No hash in the signature algorithm: no channel binding (PLUS is then not offered).
    assert cbind.certificate_hash(self_signed(ed25519.Ed25519PrivateKey.generate(), None)) is None
    # The proxy's own test certificate, read from its PEM file.
    pem = Path(certs["cert"]).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert cbind.certificate_file_hash(certs["cert"]) == hashlib.sha256(der).digest()
    assert cbind.certificate_file_hash(str(tmp_path / "missing.crt")) is None
    assert cbind.certificate_hash(b"\x30\x03\x02\x01") is None  # truncated DER


# --- bad input around TLS -------------------------------------------------------------------------


def _read_fatal(sock: socket.socket | ssl.SSLSocket) -> dict[str, str]:
    """Everything until the proxy closes: exactly one message, a FATAL ErrorResponse."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data[:1] == b"E", data
    length = int.from_bytes(data[1:5], "big")
    assert len(data) == 1 + length, data  # nothing after the error
    fields = m.parse_error_fields(data[5:])
    assert fields["S"] == "FATAL"
    return fields


def test_plaintext_startup_where_tls_is_required_is_28000(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    proxy = _tls_proxy(make_proxy, certs, "require")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "postgres"}))
        fields = _read_fatal(sock)
    assert fields["C"] == "28000"
    assert 'pgproxy requires TLS for user "postgres"' in fields["M"]
    with psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_second_ssl_request_inside_tls_is_08P01(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    proxy = _tls_proxy(make_proxy, certs, "require")
    ctx = ssl.create_default_context(cafile=certs["ca"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as plain:
        plain.sendall(m.ssl_request())
        assert plain.recv(1) == b"S"
        with ctx.wrap_socket(plain, server_hostname="localhost") as sock:
            sock.sendall(m.ssl_request())
            fields = _read_fatal(sock)
    assert fields["C"] == "08P01"
    assert "duplicate encryption request" in fields["M"]
    with psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
