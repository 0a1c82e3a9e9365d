"""TLS contexts for both sides, built once per configuration.

Client side (pgproxy as the server): ``client_tls_mode`` says whether an SSLRequest is answered
``S`` and whether plaintext logins are refused; ``verify-ca``/``verify-full`` also ask clients for
a certificate signed by ``client_tls_ca_file`` (verify-full additionally wants its CN to be the
user name, as Postgres' ``clientcert=verify-full``).

Upstream (pgproxy as the client): ``server_tls_mode``, overridden per database by the URL's
``sslmode``, follows libpq's sslmode meanings: ``prefer`` tries TLS and falls back, ``require``
insists without checking the certificate, ``verify-ca`` checks the chain against
``server_tls_ca_file`` (or the system store), ``verify-full`` also checks the host name (SNI is
sent whenever the host is a name). ALPN ``postgresql`` is offered on both sides, as
PostgreSQL 17 does: direct TLS (``sslnegotiation=direct``) needs it, SSLRequest allows it.
"""

from __future__ import annotations

import functools
import ssl
from typing import Literal

ClientTlsMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
ServerTlsMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class TlsConfigError(ValueError):
    pass


def server_side_context(
    mode: str, cert_file: str, key_file: str, ca_file: str
) -> ssl.SSLContext | None:
    """The context used to accept clients' TLS, or None when the proxy offers none."""
    if mode == "disable":
        return None
    if not cert_file or not key_file:
        raise TlsConfigError(
            f"client_tls_mode = {mode!r} needs client_tls_cert_file and client_tls_key_file"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if mode in ("verify-ca", "verify-full"):
        if not ca_file:
            raise TlsConfigError(f"client_tls_mode = {mode!r} needs client_tls_ca_file")
        ctx.load_verify_locations(ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    # PG 17 direct TLS negotiates ALPN "postgresql" (PROTOCOL-NOTES 29).
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


@functools.cache
def client_side_context(mode: str, ca_file: str) -> ssl.SSLContext | None:
    """The context used towards an upstream server, or None for plaintext (one per setting,
    so pools with unchanged settings compare equal across reloads)."""
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("verify-ca", "verify-full"):
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.load_default_certs()
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    # As libpq 17+, on both negotiations (servers before 17 ignore it; direct TLS needs it).
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def plaintext_allowed(client_mode: str) -> bool:
    return client_mode in ("disable", "allow", "prefer")


def upstream_requires_tls(mode: str) -> bool:
    return mode in ("require", "verify-ca", "verify-full")
