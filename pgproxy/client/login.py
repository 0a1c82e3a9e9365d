"""A client's login: startup packet, TLS, hba, authentication, pool choice, startup parameters.

Owns everything that happens once per connection before the first ReadyForQuery: the
SSLRequest/GSSENCRequest dance, a CancelRequest routed to its session, protocol version
negotiation, ``client_tls_mode``, the hba decision, authentication (``pgproxy.auth.frontend``)
with the stored secret or ``auth_query``, what a proved password teaches SCRAM/md5
pass-through, and the parameters the client will see (startup values validated on a server
once per pool, as Postgres rejects a bad one at connect time). A login to the admin console
(database ``pgbouncer`` or ``pgproxy``) is authenticated the same way, never by auth_query,
then allowed only to ``admin_users`` and ``stats_users``; its startup parameters are ignored.

Rule: it runs over the connection as a :class:`~pgproxy.wire.WireProtocol` (a message channel)
and the :class:`~pgproxy.client.host.ProxyServices`, and never takes the session: it returns a
:class:`Login` (or None for a CancelRequest), and the session does the hand-off.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from pgproxy import params, tls
from pgproxy.admin.commands import console_role
from pgproxy.auth import hba
from pgproxy.auth.frontend import TRUST, authenticate_client
from pgproxy.backend import ServerConnection
from pgproxy.client.host import ProxyServices
from pgproxy.client.settings import ClientSettings
from pgproxy.config import CONSOLE_DATABASES, ProxySettings
from pgproxy.params import READ_ONLY_PARAMETERS
from pgproxy.pool.pool import Pool
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.wire import WireProtocol, log


@dataclass
class Login:
    user: str
    database: str
    pool: Pool | None  # None: the admin console
    settings: ClientSettings
    server: ServerConnection | None  # a server the login used, to be linked or released
    console: str | None = None  # the admin console's role (commands.ADMIN or STATS)
    protocol_minor: int = 0  # the protocol version agreed with the client: 3.<this>


# The newest protocol the proxy speaks to clients: 3.2 (longer cancel keys), whatever the
# upstream speaks (the proxy's own cancel keys are what a 3.2 client holds).
NEWEST_MINOR: Final = 2


async def log_in(conn: WireProtocol, host: ProxyServices, local: bool) -> Login | None:
    """Read the startup, authenticate, choose the pool; None: no login (a CancelRequest, a
    refused direct-TLS ClientHello)."""
    startup = await _read_startup(conn, host, local)
    if startup is None:
        return None
    login = await _authenticate(conn, host, local, startup)
    login.protocol_minor = min(startup.minor, NEWEST_MINOR)
    return login


async def _read_startup(
    conn: WireProtocol, host: ProxyServices, local: bool
) -> m.StartupMessage | None:
    if not conn.tls and await conn.peek_byte() == m.TLS_HANDSHAKE_RECORD:
        # A direct-TLS ClientHello where no TLS is offered (pgproxy.accept hands it to TLS
        # when client TLS is configured): a TLS alert libpq can name, where Postgres just
        # closes, and a plaintext error would read as "wrong version number".
        log.info("direct TLS from %s refused: %s", conn.transport.get_extra_info("peername"),
                 "no TLS on unix sockets" if local else "client TLS is not configured")  # fmt: skip
        conn.write(m.TLS_REFUSAL_ALERT)
        conn.close()
        return None
    seen_ssl = seen_gss = False
    while True:
        packet = m.parse_startup_packet(await conn.read_startup_packet(m.STARTUP_MAX_LENGTH))
        if isinstance(packet, m.StartupMessage):
            # As Postgres: names longer than NAMEDATALEN - 1 bytes are cut before any use,
            # so hba, [users] and pools see the role the upstream will log in as.
            for key in ("user", "database"):
                if key in packet.params:
                    packet.params[key] = hba.truncate_name(packet.params[key])
            return packet
        if isinstance(packet, m.CancelRequest):
            host.cancel(packet)
            conn.close()
            return None
        # SSLRequest / GSSENCRequest: one of each is legal (libpq's gssencmode=prefer
        # falls back to SSL on the same socket). GSS encryption is never offered.
        kind_seen = seen_ssl if isinstance(packet, m.SSLRequest) else seen_gss
        if kind_seen or conn.tls:
            raise m.ProtocolError("duplicate encryption request")
        if conn.has_buffered_input():
            # Plaintext sent ahead would be read as if it came through TLS (CVE-2021-3935).
            raise m.ProtocolError("received unencrypted data after encryption request")
        # As Postgres: no TLS over a unix socket (the kernel already keeps it private).
        ctx = None if local else host.client_tls
        if isinstance(packet, m.SSLRequest):
            seen_ssl = True
            if ctx is not None:
                conn.write(b"S")
                await conn.start_tls(ctx, server_side=True)
                continue
        else:
            seen_gss = True
        conn.write(b"N")


async def _authenticate(
    conn: WireProtocol, host: ProxyServices, local: bool, startup: m.StartupMessage
) -> Login:
    config = host.config
    major, minor = startup.version >> 16, startup.minor
    if major != 3:
        raise fatal(
            errors.FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2",
        )
    # As Postgres 18: a newer minor (libpq 19's "grease" too) or unknown _pq_. options are
    # answered with the newest minor spoken and the options not understood (PROTOCOL-NOTES 27).
    if minor > NEWEST_MINOR or startup.unknown_protocol_options:
        conn.write(
            m.negotiate_protocol_version(min(minor, NEWEST_MINOR), startup.unknown_protocol_options)
        )
    startup_params = startup.params
    user = startup_params.get("user", "")
    if not user:
        raise fatal(
            errors.INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        )
    _check_tls(conn, host, local, user)
    database = startup_params.get("database") or user
    # Draining, or DISABLE; the admin console stays open to operators through a drain.
    refusal = None if database in CONSOLE_DATABASES else host.login_refusal(database)
    if refusal is not None:
        raise refusal
    if startup_params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise fatal(
            errors.FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgproxy"
        )
    if host.client_count > config.proxy.max_client_conn:
        raise fatal(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")

    console = database in CONSOLE_DATABASES
    peer = conn.transport.get_extra_info("peername")
    method = hba.decide(
        config.hba,
        config.proxy.auth_type,
        database=database,
        user=user,
        address=peer[0] if isinstance(peer, tuple) else None,
        tls=conn.tls,
        local=local,
    )
    # The stored secret: [users], else auth_query (None: unknown, expired, no password).
    user_cfg = config.users.get(user)
    secret = user_cfg.password if user_cfg is not None else None
    db = config.database_for(database)
    lookup_db = None  # the database whose auth_user looks this user up
    if user_cfg is None and db is not None and host.auth_query.auth_user(config, db):
        lookup_db = db
        if method != TRUST:  # config refuses auth_user without a password method anyway
            secret = await host.auth_query.lookup(config, db, user)
    try:
        result = await authenticate_client(
            conn, method, user, secret, channel_binding=host.cert_binding if conn.tls else None
        )
    except PgError as exc:
        if exc.sqlstate == errors.INVALID_PASSWORD:
            if lookup_db is not None:  # the password may have changed upstream
                host.auth_query.forget(config, lookup_db, user)
            if config.proxy.auth_failure_delay:  # as Postgres' auth_delay
                await asyncio.sleep(config.proxy.auth_failure_delay)
        raise
    if result.method == TRUST:
        if user_cfg is None and config.users and lookup_db is None:
            raise fatal(errors.INVALID_AUTHORIZATION_SPECIFICATION, f'role "{user}" does not exist')
    elif (
        secret is not None
        and db is not None
        and (db.user is None or db.user == user)
        and host.config is config  # a reload meanwhile: the secret may be stale
    ):
        # What SCRAM/md5 pass-through upstream can use from now on. Only a login that
        # proved the password teaches anything: a trust login proved nothing, and must
        # never unlock what a stored md5 hash or SCRAM verifier can do upstream.
        host.pass_through.learn((db.host, db.port, user), secret, result.scram_client_key)
    if console:  # db is None for its names: no auth_query ran, nothing was learnt
        return _console_login(config.proxy, user, database, startup_params)

    pool = host.pool_for(database, user)
    startup_gucs = {
        k.lower(): v
        for k, v in startup_params.items()
        if k not in params.NON_GUC_STARTUP_PARAMETERS
    }
    if "options" in startup_params:
        startup_gucs.update(params.parse_options(startup_params["options"]))
    settings, server = await _prepare_parameters(host, pool, startup_gucs)
    return Login(user, database, pool, settings, server)


def _console_login(
    settings: ProxySettings, user: str, database: str, startup_params: dict[str, str]
) -> Login:
    """An authenticated user asking for the admin console: in, if it is allowed there."""
    role = console_role(settings.admin_users, settings.stats_users, user)
    if role is None:
        raise fatal(
            errors.INVALID_AUTHORIZATION_SPECIFICATION,
            f'user "{user}" is not allowed to use the pgproxy admin console',
            hint="list it in proxy.admin_users or proxy.stats_users",
        )
    shown = {"application_name": startup_params.get("application_name", "")}
    return Login(user, database, None, ClientSettings(shown, {}), None, role)


def _check_tls(conn: WireProtocol, host: ProxyServices, local: bool, user: str) -> None:
    """Enforce client_tls_mode once the client says who it is."""
    mode = host.config.proxy.client_tls_mode
    if not conn.tls:
        # A unix socket never leaves the host, so "require" (privacy) holds there; the
        # verify modes authenticate by certificate, which a unix client cannot show.
        if not tls.plaintext_allowed(mode) and not (local and mode == "require"):
            raise fatal(
                errors.INVALID_AUTHORIZATION_SPECIFICATION,
                f'pgproxy requires TLS for user "{user}" (client_tls_mode = {mode})',
                hint="connect with sslmode=require or stricter",
            )
        return
    if mode == "verify-full":
        cert = conn.transport.get_extra_info("peercert") or {}
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        if user not in names:
            raise fatal(
                errors.INVALID_AUTHORIZATION_SPECIFICATION,
                f'certificate authentication failed for user "{user}"',
                detail="The certificate's common name does not match the user name.",
            )


async def _learn_server_params(pool: Pool, timeout: float) -> ServerConnection | None:
    """A server whose handshake teaches ``pool`` its server_params (one login at a time),
    or None if another login did it meanwhile. A function of its own, not a second check
    in the caller, whose ``is None`` mypyc would trust across the wait (a TypeError).

    A login that waited while another's connect attempt failed fails with that error: against
    a black-holed upstream each client waits for the attempt in flight when it came, not for
    one more attempt after it (one after another, they would wait n x the connect timeout)."""
    failures = pool.connect_failures
    async with pool.params_lock:
        if pool.server_params is None:
            error = pool.last_connect_error
            if pool.connect_failures != failures and error is not None:
                raise error
            return await pool.acquire(timeout)
    return None


async def _prepare_parameters(
    host: ProxyServices, pool: Pool, startup_gucs: dict[str, str]
) -> tuple[ClientSettings, ServerConnection | None]:
    """Work out the parameters this client sees; validate new startup values on a server.

    Postgres rejects a bad startup value (FATAL) at connect time, so the proxy does too,
    once per distinct (name, value) per pool; returns the server used, if one was needed.
    """
    server: ServerConnection | None = None
    timeout = host.config.proxy.query_wait_timeout
    if pool.server_params is None:
        server = await _learn_server_params(pool, timeout)
    assert pool.server_params is not None
    canonical = {k.lower(): k for k in pool.server_params}
    wanted = {canonical.get(k, k): v for k, v in startup_gucs.items()}
    unknown = {
        k: v for k, v in wanted.items() if (k, v) not in pool.validated and k != "application_name"
    }
    if unknown:
        if server is None:
            server = await pool.acquire(timeout)
        sql = params.sync_sql(unknown, {}, {}, {})
        assert sql is not None
        try:
            result = await server.run_internal(sql)
        except BaseException:
            # Failed, timed out or cancelled mid-query: its state is unknown.
            pool.close_server(server)
            raise
        if result.error is not None:
            pool.release(server)  # a failed SET leaves the server as it was
            raise result.error.with_severity("FATAL")
        for k, v in unknown.items():
            pool.validated[(k, v)] = server.params.get(k) if k in canonical.values() else None
        # What was SET is now this server's state.
        for k in unknown:
            if k not in canonical.values():
                server.proxy_set[k] = params.set_statement(k, unknown[k])
    reported = {k: v for k, v in pool.server_params.items() if k not in READ_ONLY_PARAMETERS}
    unreported: dict[str, str] = {}
    for k, v in wanted.items():
        if k in READ_ONLY_PARAMETERS:
            continue
        if k in reported:
            norm = pool.validated.get((k, v))
            reported[k] = norm if norm is not None else v
        else:
            unreported[k] = params.set_statement(k, v)
    return ClientSettings(reported, unreported), server
