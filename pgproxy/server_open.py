"""Opening an upstream server connection: connect, TLS negotiation, startup and authentication.

Owns everything a :class:`~pgproxy.backend.ServerConnection` goes through before its first
query: the socket (TCP or unix), TLS (the SSLRequest exchange, or direct TLS when the URL
says ``sslnegotiation=direct``), the StartupMessage, authentication
(auth/upstream.py) and the startup replies up to the first ReadyForQuery (parameters, key
data).

Rules that keep it honest:
* ``open_server`` returns a server that is ready (``ready`` set, handshake buffers ended) or
  raises a PgError, having aborted the socket first: a half-open server never escapes.
* It uses only what ServerConnection offers anyone (its WireProtocol reads and writes, its
  public fields); backend.py never imports this module, so nothing here is on the hot path.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from pgproxy.auth.credentials import UpstreamSecret
from pgproxy.auth.upstream import authenticate_upstream
from pgproxy.backend import ServerConnection, ServerHome
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.protocol.framing import LARGE_MESSAGE_LIMIT
from pgproxy.unixsocket import open_upstream, upstream_socket
from pgproxy.wire import log


@dataclass(frozen=True)
class UpstreamTls:
    context: ssl.SSLContext
    required: bool  # False: "prefer" (plaintext if the server says no)
    direct: bool = False  # sslnegotiation=direct: TLS from the first byte (PostgreSQL 17+)


async def open_server(
    home: ServerHome,
    max_prepared_statements: int,
    host: str,
    port: int,
    params: dict[str, str],
    password: UpstreamSecret | None,
    tls: UpstreamTls | None = None,
) -> ServerConnection:
    """Connect and authenticate a server for ``home``; raises PgError (with the server's
    SQLSTATE when it said no).

    A ``host`` starting with ``/`` is a unix socket directory, as in libpq, and as libpq
    does there, no TLS is tried on it (the bytes never leave the host)."""
    loop = asyncio.get_running_loop()
    path = upstream_socket(host, port)

    def server() -> ServerConnection:
        return ServerConnection(home, max_prepared_statements)

    # Protocol 3.2 first (PostgreSQL 18: 32-byte cancel keys; 11 to 17 answer with
    # NegotiateProtocolVersion and speak 3.0); 3.0 again for a server that refuses 3.2 outright.
    for version in (m.PROTOCOL_3_2, m.PROTOCOL_3_0):
        try:
            if path is not None:
                _, conn = await loop.create_unix_connection(server, path)
            elif tls is not None and tls.direct:
                conn = await _open_direct_tls(server, host, port, tls.context)
            else:
                _, conn = await loop.create_connection(server, host, port)
        except ssl.SSLError as exc:  # a certificate refused among them
            raise PgError(
                errors.CONNECTION_FAILURE, f"TLS handshake with upstream {host} failed: {exc}"
            ) from exc
        except OSError as exc:
            raise PgError(
                errors.CONNECTION_FAILURE,
                f"could not connect to upstream server {host}:{port}: {exc.strerror or exc}",
            ) from exc
        try:
            if tls is not None and path is None and not tls.direct:
                await _negotiate_tls(conn, tls, host)
            elif conn.tls:
                _check_alpn(conn, host)
            await _handshake(conn, params, password, version)
        except PgError as exc:
            conn.abort()
            if version != m.PROTOCOL_3_0 and _refuses_protocol(exc):
                continue
            raise
        except BaseException:
            conn.abort()
            raise
        conn.address = (host, port)
        return conn
    raise AssertionError("unreachable: the 3.0 attempt returns or raises")


def _refuses_protocol(error: PgError) -> bool:
    """A server too old to negotiate (Postgres before 11, some poolers) refuses a newer
    protocol minor outright; its wording varies, its subject does not."""
    return "protocol" in error.message.lower()


async def _open_direct_tls(
    server: Callable[[], ServerConnection], host: str, port: int, context: ssl.SSLContext
) -> ServerConnection:
    """A connection encrypted from its first byte (libpq's ``sslnegotiation=direct``): no
    SSLRequest round trip. Python sends SNI when ``host`` is a name, never for an address."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(server, host, port, ssl=context, server_hostname=host)
    conn.tls = True
    return conn


def _check_alpn(conn: ServerConnection, host: str) -> None:
    """As libpq: over direct TLS the server must have agreed to ALPN ``postgresql``, or
    nothing says it is a PostgreSQL server (or one that understands direct TLS)."""
    ssl_object = conn.transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != "postgresql":
        raise PgError(
            errors.CONNECTION_FAILURE,
            # (No word "protocol" here: that would read as a refused 3.2, tried again as 3.0.)
            f"upstream {host}: direct TLS connection established without ALPN 'postgresql' "
            "(sslnegotiation=direct needs PostgreSQL 17 or later)",
        )


async def _negotiate_tls(conn: ServerConnection, tls: UpstreamTls, host: str) -> None:
    conn.write(m.ssl_request())
    try:
        answer = await conn.read_byte()
    except ConnectionError as exc:
        raise PgError(
            errors.CONNECTION_FAILURE, f"upstream closed during SSLRequest: {exc}"
        ) from exc
    if answer == b"S":
        if conn.has_buffered_input():
            # Bytes sent before the handshake would be trusted as if encrypted
            # (CVE-2021-23222 in libpq).
            raise PgError(errors.PROTOCOL_VIOLATION, "received unencrypted data after SSL response")
        try:  # Python sends SNI only when host is a name
            await conn.start_tls(tls.context, server_side=False, server_hostname=host)
        except (ssl.SSLError, OSError, ConnectionError) as exc:
            raise PgError(
                errors.CONNECTION_FAILURE, f"TLS handshake with upstream {host} failed: {exc}"
            ) from exc
    elif answer == b"N":
        if tls.required:
            raise PgError(
                errors.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                f"upstream {host} does not support TLS, but server_tls_mode requires it",
            )
    else:
        raise PgError(errors.PROTOCOL_VIOLATION, f"unexpected answer {answer!r} to SSLRequest")


async def _handshake(
    conn: ServerConnection,
    params: dict[str, str],
    password: UpstreamSecret | None,
    version: int = m.PROTOCOL_3_0,
) -> None:
    conn.write(m.startup_message(params, version))
    try:
        await authenticate_upstream(conn, params["user"], password)
        while True:
            type_, body = await conn.read_message(LARGE_MESSAGE_LIMIT)
            if type_ == m.PARAMETER_STATUS:
                name, value = m.parse_parameter_status(body)
                conn.params[name] = value
            elif type_ == m.BACKEND_KEY_DATA:
                conn.pid, conn.secret = m.parse_backend_key_data(body)
            elif type_ == m.READY_FOR_QUERY:
                break
            elif type_ == m.ERROR_RESPONSE:
                raise PgError.from_fields(m.parse_error_fields(body))
            elif type_ in (m.NOTICE_RESPONSE, m.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise PgError(
                    errors.PROTOCOL_VIOLATION,
                    f"unexpected message {chr(type_)!r} from upstream during startup",
                )
    except (ConnectionError, m.ProtocolError) as exc:
        raise PgError(
            errors.CONNECTION_FAILURE, f"upstream server closed the connection: {exc}"
        ) from exc
    conn.ready = True
    conn.end_handshake()


async def send_cancel(server: ServerConnection, host: str, port: int, timeout: float) -> None:
    """Ask Postgres to cancel what ``server`` runs (a CancelRequest on a connection of its
    own, as libpq sends one); ``server.cancels_in_flight`` is decremented when done."""
    try:
        reader, writer = await asyncio.wait_for(open_upstream(host, port), timeout or None)
        writer.write(m.cancel_request(server.pid, server.secret))
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # the server closes when done
        writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel to %s:%d failed: %s", host, port, exc)
    finally:
        server.cancels_in_flight -= 1
