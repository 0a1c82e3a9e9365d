"""One client session: startup, authentication, and the per-message forwarding state machine.

Theory of operation. After login a session is in one of these states:

* **unlinked** (``server is None``, ``_waiting`` False): the client owes nothing and holds no
  server. A message that needs a server starts an acquire; a lone Sync is answered here (there is
  nothing to synchronise), a lone Flush is a no-op.
* **waiting**: an acquire is in flight; further bytes are buffered in ``_inbuf`` (bounded: past
  ``_INBUF_PAUSE`` the client stops being read).
* **linked**: messages are walked header by header and forwarded in runs to ``server``; its
  :class:`~pgproxy.protocol.flow.ServerFlow` counts what the server owes. In transaction mode the
  server calls ``server_released()`` when it owes nothing and no transaction is open; in session
  mode the link lasts until the client leaves.
* **skipping**: an error the proxy made up (no server could be had, the server died, a cancel
  hit a queued request) ended the current unit; like Postgres after an extended-protocol error,
  messages are dropped up to the next Sync, which is answered with ReadyForQuery.

The LISTEN multiplexer hooks in at two points: messages a session can answer without a server
(``_process`` before acquiring) and bytes injected just before a ReadyForQuery ``I``
(``on_ready``).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final

from pgproxy import params as session_params
from pgproxy import precheck, prepared, sql, tls
from pgproxy.auth import hba
from pgproxy.auth.frontend import TRUST, authenticate_client
from pgproxy.backend import ServerConnection, ServerLink
from pgproxy.pool.pool import READ_ONLY_PARAMETERS, Pool, ServerRequest, pool_of
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.protocol.framing import (
    FRONTEND_LIMIT_OF,
    check_frontend_header,
    length_at,
    read_length,
    type_table,
)
from pgproxy.wire import WireProtocol, log

if TYPE_CHECKING:
    from pgproxy.app import Proxy
    from pgproxy.pubsub.listener import Listener

_INBUF_PAUSE: Final = 256 * 1024  # stop reading a client that sends this much while it waits
_UTF8_NAMES: Final = frozenset(("UTF8", "UTF-8", "UNICODE"))
# Messages the proxy needs whole in transaction mode: their text decides what happens
# (LISTEN, dirty servers) or their statement names are rewritten (prepared.py).
_NEED_WHOLE: Final = type_table((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE))
_SESSION_NEED_WHOLE: Final = type_table(())  # session mode inspects nothing
# A Query larger than this is streamed uninspected (never a LISTEN fast path; its server is
# cleaned as if it had LISTENed), so no client makes the proxy buffer much before a server is
# even in sight.
_WHOLE_QUERY_LIMIT: Final = 1024 * 1024
# Text no server can parse: sent in place of a refused statement, so the server raises the
# error (a syntax error the proxy rewords) exactly where the statement's own would be.
_PROVOKE: Final = "pgproxy_refused_statement"


def _renamer(server_name: str, client_name: str) -> prepared.ErrorRewrite:
    """Reword a server error about a proxy-named statement with the client's name for it."""

    def rename(fields: dict[str, str]) -> dict[str, str]:
        out = dict(fields)
        out["M"] = out["M"].replace(f'"{server_name}"', f'"{client_name}"')
        return out

    return rename


class ClientSession(WireProtocol, ServerLink):
    __slots__ = (
        "_doomed",
        "_drop",
        "_fence_done",
        "_idle_tx_timer",
        "_inbuf",
        "_inbuf_matters",
        "_listener",
        "_logged_in",
        "_may_have_notified",
        "_need",
        "_notify_queue",
        "_notify_queued",
        "_param_fixes",
        "_param_state",
        "_passthrough",
        "_pid_mapped",
        "_request",
        "_resets",
        "_savepoints",
        "_skipping",
        "_startup_reported",
        "_startup_unreported",
        "_state_logged",
        "_sub_error",
        "_sub_held",
        "_sub_pending",
        "_sub_portals",
        "_sub_rollback",
        "_sub_statements",
        "_task",
        "_text_rules_ok",
        "_unnamed",
        "_waiting",
        "connected_at",
        "database",
        "local",
        "may_stall",
        "peer",
        "pool",
        "proxy",
        "reported",
        "secret",
        "server",
        "statements",
        "unreported",
        "user",
        "vpid",
    )

    def __init__(self, proxy: Proxy, local: bool = False) -> None:
        super().__init__()
        self.proxy = proxy
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.user = ""
        self.database = ""
        self.vpid = 0
        self.secret = b""
        self.peer = ""
        self.local = local  # came through the unix-domain socket (told by its listener)
        self.connected_at = time.monotonic()
        self.reported: dict[str, str] = {}  # settable reported parameters, as the client saw them
        # Unreported GUCs (name -> the SET statement giving the client's value), and the ones
        # from the startup packet, which RESET returns to.
        self.unreported: dict[str, str] = {}
        self._startup_unreported: dict[str, str] = {}
        self._startup_reported: dict[str, str] = {}  # what RESET returns reported ones to
        # ParameterStatus to send before the next ReadyForQuery: a RESET made the server
        # report its own default where this client's is the startup value.
        self._param_fixes: dict[str, str] = {}
        self._resets: set[str] = set()  # reported parameters RESET by a committed unit
        # This client's parameters as an interned snapshot (None: changed, to be recomputed).
        # A server remembers the snapshot it was last synchronised to, so a client getting a
        # server in the state it wants (the common case) costs one identity comparison.
        self._param_state: session_params.ParamState | None = None
        # Whether pglast reads this client's text as the server would (UTF-8, standard
        # strings): the LISTEN fast path needs it; None = to be worked out again.
        self._text_rules_ok: bool | None = None
        self._inbuf = bytearray()
        self._inbuf_matters: bool | None = None  # might_matter of _inbuf's first message
        self._need = 0
        self._passthrough = 0  # bytes of a large message still to forward as they arrive
        self._drop = 0  # bytes of a skipped message still to discard as they arrive
        self._waiting = False
        self._skipping = False
        self._task: asyncio.Task[None] | None = None
        self._request: ServerRequest | None = None  # waiting for a server
        self._idle_tx_timer: asyncio.TimerHandle | None = None
        self._logged_in = False
        self.statements: dict[str, prepared.Statement] = {}  # named prepared statements
        # The Parse body (after the name) of the client's unnamed statement; servers compare it
        # by identity to tell whether the unnamed statement they hold is this one.
        self._unnamed: bytes | None = None
        self._state_logged: set[str] = set()  # kinds of untracked session state logged once
        self._listener: Listener | None = None
        self._notify_queue: list[bytes] = []  # held back until the client is between transactions
        self._notify_queued = 0
        self._doomed: PgError | None = None  # to be disconnected at its next ReadyForQuery I
        # LISTEN slow path: effects forwarded to a pooled server, applied when their
        # transaction commits, dropped if it rolls back; their channels are held meanwhile.
        self._sub_pending: list[sql.Subscription | sql.SettingEffect] = []
        self._sub_held: list[str] = []
        self._sub_error = False
        self._sub_rollback = False
        # Savepoints of the open transaction: (name, len(pending), len(held)) when taken.
        self._savepoints: list[tuple[str, int, int]] = []
        # Prepared statements/portals that LISTEN or NOTIFY: (effects, may notify).
        self._sub_statements: dict[str, tuple[list[sql.Subscription | sql.SettingEffect], bool]]
        self._sub_statements = {}
        self._sub_portals: dict[str, tuple[list[sql.Subscription | sql.SettingEffect], bool]]
        self._sub_portals = {}
        self._may_have_notified = False  # the transaction in flight may have sent NOTIFY
        self._fence_done = False
        self.may_stall = False  # see ServerLink
        self._pid_mapped: tuple[Listener, int] | None = None  # see _note_notify

    def __repr__(self) -> str:
        return f"<client {self.vpid} {self.user}@{self.database} {self.peer}>"

    # --- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Not inferred from the peer name: a TCP client reset early has none (fail closed:
        # no address, so it matches only rules for "all").
        peer = transport.get_extra_info("peername")
        if self.local:
            self.peer = "[local]"
        else:
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "[unknown]"
        self.proxy.client_opened(self)
        self._task = asyncio.get_running_loop().create_task(self._login())

    def on_lost(self, exc: Exception | None) -> None:
        self.proxy.client_closed(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._request is not None:
            self._request.cancel()  # if a server was already assigned, it is handed back
        self._cancel_idle_tx_timer()
        self._drop_pending()
        self._unmap_pid()
        if self._listener is not None:
            self._listener.drop(self)
        server, self.server = self.server, None
        if server is not None:
            self._give_back(server)

    def _give_back(self, server: ServerConnection) -> None:
        """Return a server whose client has gone: reuse it only if it is provably clean."""
        pool = pool_of(server)
        flow = server.flow
        if server.closed:
            return
        if flow.pending or flow.unsynced or flow.copy_in:
            # Mid-query: its results would go nowhere and its state is unknown.
            pool.close_server(server)
            return
        cleanup = []
        if flow.in_transaction:
            cleanup.append("ROLLBACK")
        if pool.mode == "session" and pool.settings.reset_query:
            cleanup.append(pool.settings.reset_query)
        if not cleanup:
            pool.release(server)
            return
        server.unlink()
        self.proxy.spawn(_clean_and_release(server, cleanup))

    def fail(self, error: PgError) -> None:
        """Tell the client and, for a FATAL error, close."""
        if self.closed:
            return
        self.write(m.error_response(error.fields()))
        if error.fatal:
            self.close()

    # --- login -------------------------------------------------------------------------------

    async def _login(self) -> None:
        timeout = self.proxy.config.proxy.client_login_timeout
        try:
            async with asyncio.timeout(timeout or None):
                startup = await self._read_startup()
                if startup is None:
                    return
                await self._authenticate_and_start(startup)
            if self._task is asyncio.current_task():
                self._task = None  # a finished task held by every idle client (~0.7 KiB)
        except PgError as exc:
            if not exc.fatal:
                exc = exc.with_severity("FATAL")
            log.info("login failed for %s: %s", self.peer, exc.message)
            self.fail(exc)
        except m.ProtocolError as exc:
            self.fail(fatal(errors.PROTOCOL_VIOLATION, str(exc)))
        except TimeoutError:
            self.fail(fatal(errors.QUERY_CANCELED, "canceling authentication due to timeout"))
        except ConnectionError:
            self.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%r: internal error during login", self)
            self.fail(fatal(errors.INTERNAL_ERROR, "internal error in pgproxy during login"))

    async def _read_startup(self) -> m.StartupMessage | None:
        seen_ssl = seen_gss = False
        while True:
            packet = m.parse_startup_packet(await self.read_startup_packet(m.STARTUP_MAX_LENGTH))
            if isinstance(packet, m.StartupMessage):
                # As Postgres: names longer than NAMEDATALEN - 1 bytes are cut before any use,
                # so hba, [users] and pools see the role the upstream will log in as.
                for key in ("user", "database"):
                    if key in packet.params:
                        packet.params[key] = hba.truncate_name(packet.params[key])
                return packet
            if isinstance(packet, m.CancelRequest):
                self.proxy.cancel(packet)
                self.close()
                return None
            # SSLRequest / GSSENCRequest: one of each is legal (libpq's gssencmode=prefer
            # falls back to SSL on the same socket). GSS encryption is never offered.
            kind_seen = seen_ssl if isinstance(packet, m.SSLRequest) else seen_gss
            if kind_seen or self.tls:
                raise m.ProtocolError("duplicate encryption request")
            if self.has_buffered_input():
                # Plaintext sent ahead would be read as if it came through TLS (CVE-2021-3935).
                raise m.ProtocolError("received unencrypted data after encryption request")
            # As Postgres: no TLS over a unix socket (the kernel already keeps it private).
            ctx = None if self.local else self.proxy.client_tls
            if isinstance(packet, m.SSLRequest):
                seen_ssl = True
                if ctx is not None:
                    self.write(b"S")
                    await self.start_tls(ctx, server_side=True)
                    continue
            else:
                seen_gss = True
            self.write(b"N")

    async def _authenticate_and_start(self, startup: m.StartupMessage) -> None:
        proxy = self.proxy
        config = proxy.config
        major, minor = startup.version >> 16, startup.minor
        if major != 3:
            raise fatal(
                errors.FEATURE_NOT_SUPPORTED,
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            )
        if minor > 0 or startup.unknown_protocol_options:
            self.write(m.negotiate_protocol_version(0, startup.unknown_protocol_options))
        params = startup.params
        user = params.get("user", "")
        if not user:
            raise fatal(
                errors.INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
        self.user = user
        self._check_tls(user)
        self.database = params.get("database") or user
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise fatal(
                errors.FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgproxy"
            )
        if proxy.client_count > config.proxy.max_client_conn:
            raise fatal(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")

        peer = self.transport.get_extra_info("peername")
        method = hba.decide(
            config.hba,
            config.proxy.auth_type,
            database=self.database,
            user=user,
            address=peer[0] if isinstance(peer, tuple) else None,
            tls=self.tls,
            local=self.local,
        )
        # The stored secret: [users], else auth_query (None: unknown, expired, no password).
        user_cfg = config.users.get(user)
        secret = user_cfg.password if user_cfg is not None else None
        db = config.database_for(self.database)
        lookup_db = None  # the database whose auth_user looks this user up
        if user_cfg is None and db is not None and proxy.auth_query.auth_user(config, db):
            lookup_db = db
            if method != TRUST:  # config refuses auth_user without a password method anyway
                secret = await proxy.auth_query.lookup(config, db, user)
        try:
            result = await authenticate_client(
                self, method, user, secret, channel_binding=proxy.cert_binding if self.tls else None
            )
        except PgError as exc:
            if exc.sqlstate == errors.INVALID_PASSWORD:
                if lookup_db is not None:  # the password may have changed upstream
                    proxy.auth_query.forget(config, lookup_db, user)
                if config.proxy.auth_failure_delay:  # as Postgres' auth_delay
                    await asyncio.sleep(config.proxy.auth_failure_delay)
            raise
        if result.method == TRUST:
            if user_cfg is None and config.users and lookup_db is None:
                raise fatal(
                    errors.INVALID_AUTHORIZATION_SPECIFICATION, f'role "{user}" does not exist'
                )
        elif (
            secret is not None
            and db is not None
            and (db.user is None or db.user == user)
            and proxy.config is config  # a reload meanwhile: the secret may be stale
        ):
            # What SCRAM/md5 pass-through upstream can use from now on. Only a login that
            # proved the password teaches anything: a trust login proved nothing, and must
            # never unlock what a stored md5 hash or SCRAM verifier can do upstream.
            proxy.pass_through.learn((db.host, db.port, user), secret, result.scram_client_key)

        pool = proxy.pool_for(self.database, user)
        self.pool = pool
        startup_gucs = {
            k.lower(): v
            for k, v in params.items()
            if k not in session_params.NON_GUC_STARTUP_PARAMETERS
        }
        if "options" in params:
            startup_gucs.update(session_params.parse_options(params["options"]))
        server = await self._prepare_parameters(pool, startup_gucs)
        # From here to the hand-off below nothing awaits: the server cannot be stranded.
        out = [m.authentication_ok()]
        assert pool.server_params is not None
        shown = dict(pool.server_params)
        shown.update(self.reported)
        out += [m.parameter_status(k, v) for k, v in shown.items()]
        self.vpid, self.secret = self.proxy.register(self)
        out.append(m.backend_key_data(self.vpid, self.secret))
        out.append(m.ready_for_query(m.IDLE))
        self.write(b"".join(out))
        self._logged_in = True
        if server is not None:
            if pool.mode == "session":
                self._link(server)
            else:
                pool.release(server)
        elif pool.mode == "session":
            self._link(await pool.acquire(config.proxy.query_wait_timeout))
        log.debug("%r: logged in", self)
        self.end_handshake()

    def _check_tls(self, user: str) -> None:
        """Enforce client_tls_mode once the client says who it is."""
        mode = self.proxy.config.proxy.client_tls_mode
        if not self.tls:
            # A unix socket never leaves the host, so "require" (privacy) holds there; the
            # verify modes authenticate by certificate, which a unix client cannot show.
            if not tls.plaintext_allowed(mode) and not (self.local and mode == "require"):
                raise fatal(
                    errors.INVALID_AUTHORIZATION_SPECIFICATION,
                    f'pgproxy requires TLS for user "{user}" (client_tls_mode = {mode})',
                    hint="connect with sslmode=require or stricter",
                )
            return
        if mode == "verify-full":
            cert = self.transport.get_extra_info("peercert") or {}
            names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            if user not in names:
                raise fatal(
                    errors.INVALID_AUTHORIZATION_SPECIFICATION,
                    f'certificate authentication failed for user "{user}"',
                    detail="The certificate's common name does not match the user name.",
                )

    async def _learn_server_params(self, pool: Pool, timeout: float) -> ServerConnection | None:
        """A server whose handshake teaches ``pool`` its server_params (one login at a time),
        or None if another login did it meanwhile. A function of its own, not a second check
        in the caller, whose ``is None`` mypyc would trust across the wait (a TypeError)."""
        async with pool.params_lock:
            if pool.server_params is None:
                return await pool.acquire(timeout)
        return None

    async def _prepare_parameters(
        self, pool: Pool, startup_gucs: dict[str, str]
    ) -> ServerConnection | None:
        """Work out the parameters this client sees; validate new startup values on a server.

        Postgres rejects a bad startup value (FATAL) at connect time, so the proxy does too,
        once per distinct (name, value) per pool; returns the server used, if one was needed.
        """
        server: ServerConnection | None = None
        timeout = self.proxy.config.proxy.query_wait_timeout
        if pool.server_params is None:
            server = await self._learn_server_params(pool, timeout)
        assert pool.server_params is not None
        canonical = {k.lower(): k for k in pool.server_params}
        wanted = {canonical.get(k, k): v for k, v in startup_gucs.items()}
        unknown = {
            k: v
            for k, v in wanted.items()
            if (k, v) not in pool.validated and k != "application_name"
        }
        if unknown:
            if server is None:
                server = await pool.acquire(timeout)
            sql = session_params.sync_sql(unknown, {}, {}, {})
            assert sql is not None
            try:
                result = await server.run_internal(sql)
            except BaseException:
                # Failed, timed out or cancelled mid-query: its state is unknown.
                pool.close_server(server)
                raise
            if result.error is not None:
                pool.release(server)  # a failed SET leaves the server as it was
                err = result.error
                raise err.with_severity("FATAL")
            for k, v in unknown.items():
                pool.validated[(k, v)] = server.params.get(k) if k in canonical.values() else None
            # What was SET is now this server's state.
            for k in unknown:
                if k not in canonical.values():
                    server.proxy_set[k] = session_params.set_statement(k, unknown[k])
        self.reported = {
            k: v for k, v in pool.server_params.items() if k not in READ_ONLY_PARAMETERS
        }
        for k, v in wanted.items():
            if k in READ_ONLY_PARAMETERS:
                continue
            if k in self.reported:
                norm = pool.validated.get((k, v))
                self.reported[k] = norm if norm is not None else v
            else:
                self.unreported[k] = session_params.set_statement(k, v)
        self._startup_unreported = dict(self.unreported)
        self._startup_reported = dict(self.reported)
        return server

    # --- streaming: client -> server ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._handshaking or self._idle_tx_timer is not None or self._inbuf or self._waiting:
            WireProtocol.data_received(self, data)  # via stream_received
        else:
            self._process(data)  # the common case, one Python call less

    def stream_received(self, data: bytes) -> None:
        if self._idle_tx_timer is not None:
            self._cancel_idle_tx_timer()
        if self._inbuf:
            self._inbuf += data
            if self._waiting:
                self._bound_inbuf()
                return
            if len(self._inbuf) < self._need:
                # Completing one message the proxy must see whole: its size is already
                # bounded by Postgres' per-type limit, so keep reading.
                return
            data = bytes(self._inbuf)
            self._inbuf.clear()
        elif self._waiting:
            self._inbuf += data
            self._bound_inbuf()
            return
        self._process(data)

    def _bound_inbuf(self) -> None:
        """While waiting for a server, stop reading a client that keeps sending."""
        if len(self._inbuf) > _INBUF_PAUSE:
            self.pause_reading()

    def _process(self, data: bytes, matters_first: bool | None = None) -> None:
        """Walk the client's messages; forward runs of them to the linked server.

        ``matters_first``: ``precheck.might_matter`` of the first message, a Query whose
        pre-check ran before it had to wait for a server."""
        server = self.server
        n = len(data)
        if (
            n >= 5
            and data[0] == m.QUERY
            and n == 1 + length_at(data, 1)[0]
            and n <= _WHOLE_QUERY_LIMIT
            and not self._passthrough
            and not self._drop
            and not self._skipping
            and (self._fast_path_allowed() if server is None else server.pool.mode == "transaction")
        ):
            # The common request, one whole Query and nothing else, in transaction mode: what
            # the loop below does with it, minus the loop. What the pre-check flags takes the
            # loop.
            if matters_first is None:
                matters_first = precheck.might_matter(data[5:])
            if not matters_first:
                if server is None:
                    server = self._try_link()
                    if server is None:
                        self._inbuf += data
                        self._inbuf_matters = False
                        self._bound_inbuf()
                        return
                self._query_forwarded(server)
                server.flow.client_message(m.QUERY)
                server.write(data)
                return
        pos = 0
        run_start = 0
        pooled = server is not None and server.pool.mode == "transaction"
        need_whole = _NEED_WHOLE if pooled else _SESSION_NEED_WHOLE
        try:
            if self._passthrough:
                pos = min(self._passthrough, n)
                self._passthrough -= pos
            elif self._drop:
                pos = run_start = min(self._drop, n)
                self._drop -= pos
            while pos < n:
                if n - pos < 5:
                    self._stash(data, pos, 5)
                    n = pos
                    break
                type_ = data[pos]
                length = length_at(data, pos + 1)[0]
                body: bytes | None = None
                matters, matters_first = matters_first, None  # might_matter(body), once known
                limit = FRONTEND_LIMIT_OF[type_]
                if not limit or length < 4 or length > limit:
                    try:
                        check_frontend_header(type_, length)
                    except m.ProtocolError as exc:
                        self._forward(server, data, run_start, pos)
                        self.fail(fatal(errors.PROTOCOL_VIOLATION, str(exc)))
                        return
                end = pos + 1 + length
                if type_ == m.TERMINATE:
                    self._forward(server, data, run_start, pos)
                    self.close()
                    return
                if self._skipping:
                    if end > n:
                        if type_ == m.SYNC:  # tiny: wait for the whole of it
                            self._stash(data, pos, end - pos)
                        else:
                            self._drop = end - n  # never buffer what is thrown away
                        n = pos if type_ == m.SYNC else n
                        run_start = n
                        break
                    if type_ == m.SYNC:
                        self._skipping = False
                        self.write(self._ready_idle())
                    pos = run_start = end
                    continue
                if server is None:
                    if type_ == m.SYNC or type_ == m.FLUSH:
                        # Nothing is in flight, so there is nothing to synchronise or flush.
                        if end > n:
                            self._stash(data, pos, end - pos)
                            n = pos
                            break
                        if type_ == m.SYNC:
                            self.write(self._ready_idle())
                        pos = run_start = end
                        continue
                    if (
                        type_ == m.QUERY
                        and length <= _WHOLE_QUERY_LIMIT
                        and self._fast_path_allowed()
                    ):
                        if end > n:
                            self._stash(data, pos, end - pos)
                            return
                        body = data[pos + 5 : end]
                        matters = precheck.might_matter(body)  # computed once per Query
                        if matters and self._answer_listening_channels(body):
                            pos = run_start = end
                            continue
                        statements = self._subscription_query(body) if matters else None
                        if statements is not None:
                            if self._subscribe(statements):
                                pos = run_start = end
                                continue
                            self._inbuf += data[end:]
                            self._waiting = True
                            return
                    server = self._try_link()
                    if server is None:
                        self._inbuf += data[pos:]  # _inbuf was empty: this message comes first
                        self._inbuf_matters = matters
                        self._bound_inbuf()
                        return
                    run_start = pos
                    pooled = server.pool.mode == "transaction"
                    need_whole = _NEED_WHOLE if pooled else _SESSION_NEED_WHOLE
                if need_whole[type_] or (type_ == m.EXECUTE and self._sub_portals):
                    if end > n:
                        self._forward(server, data, run_start, pos)
                        self._stash(data, pos, end - pos)
                        return
                    if pooled:
                        if body is None:
                            body = data[pos + 5 : end]
                        try:
                            replacement = self._inspect(server, type_, body, matters)
                        except m.ProtocolError as exc:
                            self._forward(server, data, run_start, pos)
                            self.fail(fatal(errors.PROTOCOL_VIOLATION, str(exc)))
                            return
                        except PgError as exc:
                            self._forward(server, data, run_start, pos)
                            self.fail(exc)
                            return
                        if replacement is not None:
                            # One write for the whole read, not three: released below.
                            server.hold_output()
                            self._forward(server, data, run_start, pos)
                            server.write(replacement)
                            run_start = end
                server.flow.client_message(type_)
                if end > n:
                    self._passthrough = end - n
                    pos = n
                    break
                pos = end
            self._forward(server, data, run_start, n)
        finally:
            if server is not None:
                server.release_output()  # what a replacement held back (else a no-op)

    def _forward(self, server: ServerConnection | None, data: bytes, start: int, end: int) -> None:
        if server is not None and start < end:
            server.write(data[start:end] if start or end < len(data) else data)

    def _stash(self, data: bytes, pos: int, need: int) -> None:
        self._inbuf += data[pos:]
        self._need = need

    # --- getting a server --------------------------------------------------------------------

    def _try_link(self) -> ServerConnection | None:
        """Link an idle pooled server at once if there is one; else start waiting for one."""
        pool = self.pool
        assert pool is not None
        if pool.closing:  # retired by a reload: move to its successor
            pool = self.pool = self.proxy.pool_for(self.database, self.user)
        server = pool.take_idle()
        if server is not None:
            self._link(server)
            return server
        self._waiting = True
        self._request = pool.request(self._server_ready, self.proxy.config.proxy.query_wait_timeout)
        return None

    def _server_ready(self, server: ServerConnection | None, error: BaseException | None) -> None:
        """The pool answered a request made by ``_try_link`` (maybe from inside a release)."""
        self._request = None
        if server is None:
            self._waiting = False
            if isinstance(error, PgError):
                self._fail_unit(error)
            else:
                log.error("%r: getting a server failed: %r", self, error)
                self.fail(fatal(errors.INTERNAL_ERROR, "internal error in pgproxy"))
            return
        if self.closed:
            server.pool.release(server)
            return
        self._waiting = False
        self._link(server)
        self._resume_input()

    def _resume_input(self) -> None:
        data = bytes(self._inbuf)
        self._inbuf.clear()
        self._need = 0
        matters, self._inbuf_matters = self._inbuf_matters, None
        self.resume_reading()
        if data:
            self._process(data, matters)

    def _link(self, server: ServerConnection) -> None:
        self.server = server
        server.link(self)
        state = self._param_state
        if state is None:
            state = self._param_state = session_params.param_state(self.reported, self.unreported)
        if server.param_state is not state:
            sql = session_params.sync_sql(
                self.reported, self.unreported, server.params, server.proxy_set
            )
            if sql is not None:
                server.send_internal(sql)
                server.proxy_set = dict(self.unreported)
            server.param_state = state
        if self.write_paused:
            server.pause_reading()

    def _fail_unit(self, error: PgError) -> None:
        """End the client's current unit with ``error``, as Postgres would end a failed one."""
        if error.fatal:
            self.fail(error)
            return
        self.write(m.error_response(error.fields()))
        data = bytes(self._inbuf)
        self._inbuf.clear()
        self._inbuf_matters = None
        self._need = 0
        if len(data) >= 5 and data[0] in (m.QUERY, m.FUNCTION_CALL):
            # A simple-protocol unit is that one message: it gets its ReadyForQuery now.
            end = 1 + read_length(data, 1)
            self.write(self._ready_idle())
            if end <= len(data):
                data = data[end:]
            else:
                self._drop = end - len(data)  # the rest of it is still on its way
                data = b""
        else:
            self._skipping = True  # drop through the next Sync, which gets the ReadyForQuery
        self.resume_reading()
        if data:
            self._process(data)

    # --- ServerLink: events from the linked server ------------------------------------------

    def server_output(self, data: bytes) -> None:
        self.write(data)

    def server_parameter(self, name: str, value: str) -> None:
        if name not in READ_ONLY_PARAMETERS:
            self.reported[name] = value
            self._param_state = self._text_rules_ok = None

    def server_released(self) -> bool:
        if self.pool is None or self.pool.mode == "session" or self._inbuf:
            return False
        self.server = None
        return True

    def _ready_idle(self) -> bytes:
        """A ReadyForQuery I the proxy writes itself, with what must precede it."""
        return self.on_ready(m.IDLE) + m.ready_for_query(m.IDLE)

    def on_ready(self, status: int) -> bytes:
        """Called just before a ReadyForQuery reaches the client: held notifications go first."""
        server = self.server
        if self._sub_pending or self._sub_held:
            self._settle_pending(status)
        if self._resets:
            for name in self._resets:
                self._reset_reported(name)
            self._resets.clear()
            self._param_state = self._text_rules_ok = None
            if server is not None:
                server.param_state = None
        fixes = b""
        if self._param_fixes:
            fixes = b"".join(m.parameter_status(k, v) for k, v in self._param_fixes.items())
            self._param_fixes.clear()
        if status == m.IDLE:
            if self._savepoints:
                self._savepoints.clear()
            if self._sub_portals:
                self._sub_portals.clear()  # portals end with their transaction
            if server is not None and not self._sub_pending:
                server.watch_tags = False
            if self._doomed is not None:
                asyncio.get_running_loop().call_soon(self._end_doomed)
                return fixes
            if not self._notify_queue:
                return fixes
            out = b"".join(self._notify_queue)
            self._notify_queue.clear()
            self._notify_queued = 0
            return fixes + out
        if server is not None and not server.flow.pending:
            timeout = self.proxy.config.proxy.idle_transaction_timeout
            if timeout > 0:
                self._idle_tx_timer = asyncio.get_running_loop().call_later(
                    timeout, self._idle_transaction_expired
                )
        return fixes

    def server_lost(self, error: PgError) -> None:
        self._unmap_pid()
        self._may_have_notified = False
        # Whatever the lost transaction did never committed.
        self._drop_pending()
        self._savepoints.clear()
        self._sub_portals.clear()
        self._sub_error = self._sub_rollback = False
        server, self.server = self.server, None
        if self.closed or server is None:
            return
        flow = server.flow
        log.warning("%r: server %r lost: %s", self, server, error.message)
        if self.pool is not None and self.pool.mode == "session":
            self.fail(error.with_severity("FATAL"))
            return
        if flow.in_transaction or flow.copy_in or len(flow.pending) > 1 or self._passthrough:
            # Carrying on would run the rest of the transaction in autocommit (PROTOCOL-NOTES 33).
            self.fail(error.with_severity("FATAL"))
            return
        if not flow.pending and not flow.unsynced:
            return  # nothing was in flight: the next query simply gets another server
        err = error.with_severity("ERROR")
        self.write(m.error_response(err.fields()))
        if flow.pending:
            self.write(self._ready_idle())
        else:
            self._skipping = True

    def feeder(self) -> WireProtocol | None:
        return self.server

    # --- LISTEN / NOTIFY ---------------------------------------------------------------------

    def _fast_path_allowed(self) -> bool:
        """LISTEN can be answered here only where pglast reads the text as the server would."""
        text_ok = self._text_rules_ok
        if text_ok is None:  # once per parameter change
            reported = self.reported
            text_ok = self._text_rules_ok = (
                reported.get("standard_conforming_strings", "on") == "on"
                and reported.get("client_encoding", "UTF8").upper() in _UTF8_NAMES
            )
        pool = self.pool
        return text_ok and pool is not None and pool.mode == "transaction" and self._doomed is None

    def _answer_listening_channels(self, body: bytes) -> bool:
        """Answer ``SELECT pg_listening_channels()`` from this client's own channels.

        Through a pool the server's answer would describe a random pooled server.
        ``body`` passed the ``precheck.might_matter`` pre-check.
        """
        try:
            text = m.parse_query(body)
        except m.ProtocolError:
            return False
        if not sql.is_listening_channels_query(text):
            return False
        channels = sorted(self._listener.channels_of(self)) if self._listener else []
        out = [m.row_description([("pg_listening_channels", m.TEXT_OID)])]
        out += [m.data_row([c]) for c in channels]
        out.append(m.command_complete(f"SELECT {len(channels)}"))
        self.write(b"".join(out) + self._ready_idle())
        return True

    @staticmethod
    def _subscription_query(body: bytes) -> list[sql.Subscription] | None:
        """``body`` passed the ``precheck.might_matter`` pre-check."""
        try:
            text = m.parse_query(body)
        except m.ProtocolError:
            return None  # let the server say what is wrong with it
        return sql.subscription_statements(text)

    def _subscribe(self, statements: list[sql.Subscription]) -> bool:
        """Answer a Query made only of LISTEN/UNLISTEN without a server, byte for byte.

        The statements form one implicit transaction: their combined effect is applied all at
        once, and only once every channel it adds is live upstream. True: answered now (the
        usual case: other clients listen to those channels already). False: the answer waits
        in a task for the upstream LISTEN; the caller holds the client's input meanwhile.
        """
        assert self.pool is not None
        listener = self._listener = self.proxy.listener_for(self.pool)
        wanted = sql.apply_effects(listener.channels_of(self), list(statements))
        if listener.update_now(self, wanted):
            self.write(_subscription_tags(statements) + self._ready_idle())
            return True
        self._task = asyncio.get_running_loop().create_task(
            self._answer_subscriptions(listener, statements, wanted)
        )
        return False

    async def _answer_subscriptions(
        self, listener: Listener, statements: list[sql.Subscription], wanted: set[str]
    ) -> None:
        try:
            await listener.update(self, wanted)
        except PgError as exc:
            err = exc.with_severity("ERROR")
            reply = m.error_response(err.fields())
        else:
            reply = _subscription_tags(statements)
        if self._task is asyncio.current_task():
            self._task = None  # a finished task would stay with the client (~0.7 KiB)
        self._waiting = False
        self.write(reply + self._ready_idle())
        self._resume_input()

    def _inspect(
        self, server: ServerConnection, type_: int, body: bytes, matters: bool | None
    ) -> bytes | None:
        """Transaction mode: note what this message does to the session; return what to send
        instead of it (None: send it as it is). ``matters``: ``might_matter`` of a Query's
        body, if already known."""
        if type_ == m.QUERY:
            return self._inspect_query(server, body, matters)
        if type_ == m.PARSE:
            return self._inspect_parse(server, body)
        if type_ == m.EXECUTE:
            portal, _ = m.read_cstring(body, 0)
            info = self._sub_portals.get(portal)
            if info is not None:
                effects, notifies = info
                if notifies:
                    self._note_notify(server)
                if effects:
                    self._add_pending(server, effects)
            return None
        unit = server.flow.sent
        if type_ == m.BIND:
            if body.startswith(b"\0\0"):  # unnamed portal and statement: nothing to decode
                portal, name, name_at, rest_at = "", "", 1, 2
            else:
                portal, name_at = ("", 1) if body[:1] == b"\0" else m.read_cstring(body, 0)
                name, rest_at = m.read_cstring(body, name_at)
            info = self._sub_statements.get(name)
            if info is not None:
                self._sub_portals[portal] = info
            elif self._sub_portals:
                self._sub_portals.pop(portal, None)
            if not name:
                first = self._ensure_unnamed(server, unit)
                return first + m.message(m.BIND, body) if first else None
            stmt = self.statements.get(name)
            if stmt is None:
                return None  # unknown: the server answers (26000) as it would
            return self._ensure_prepared(server, stmt, unit) + stmt.bind_message(
                body, name_at, rest_at
            )
        if type_ == m.DESCRIBE:
            kind, name = m.parse_describe_or_close(body)
            if kind != ord("S"):
                return None
            if not name:
                first = self._ensure_unnamed(server, unit)
                return first + m.message(m.DESCRIBE, body) if first else None
            stmt = self.statements.get(name)
            if stmt is None:
                return None
            return self._ensure_prepared(server, stmt, unit) + m.describe("S", stmt.server_name)
        # Close
        kind, name = m.parse_describe_or_close(body)
        (self._sub_statements if kind == ord("S") else self._sub_portals).pop(name, None)
        if kind == ord("S"):
            # The server knows no statement by the client's name, so it answers
            # CloseComplete itself; the shared server copy stays cached.
            self.statements.pop(name, None)
            if not name:
                self._unnamed = None
                server.statements.unnamed, server.statements.unnamed_unit = None, unit
        server.replies.expect(m.CLOSE_COMPLETE, False, unit)
        return None

    def _inspect_query(
        self, server: ServerConnection, body: bytes, matters: bool | None
    ) -> bytes | None:
        self._query_forwarded(server)
        if not (precheck.might_matter(body) if matters is None else matters):
            return None
        server.watch_tags = True  # DEALLOCATE ALL / DISCARD ALL clear statements
        text = m.parse_query(body)
        if sql.may_notify(text):
            self._note_notify(server)
        effects = sql.session_effects(text) or ()
        for effect in effects:
            if isinstance(effect, sql.SessionState) and self._unsupported_state(effect):
                if sql.statement_count(text) == 1:
                    return self._provoke_error(server, effect, m.query(_PROVOKE))
                # In a multi-statement Query the stand-in would replace the statements before
                # it too (changing what they do to the transaction): only log it there.
                self._log_unsupported_state(effect)
        for effect in effects:
            if isinstance(effect, sql.Listen | sql.Unlisten):
                server.needs_unlisten = True  # a LISTEN there would outlive this client
                self._add_pending(server, [effect])
            elif isinstance(effect, sql.SetParameter | sql.ResetAll):
                self._add_pending(server, [effect])
            elif isinstance(effect, sql.Deallocate):
                stmt = self.statements.get(effect.name)
                if (
                    stmt is not None
                    and server.flow.status != m.FAILED_TRANSACTION  # else: 25P02, kept
                    and sql.is_only(text, effect)
                ):
                    return self._deallocate(server, effect.name, stmt)
            elif not isinstance(effect, sql.SessionState):
                self._savepoint_op(effect)
        return None

    def _query_forwarded(self, server: ServerConnection) -> None:
        """A simple Query destroys the unnamed statement, on the server and for the client."""
        self._unnamed = None
        server.statements.unnamed, server.statements.unnamed_unit = None, server.flow.sent

    def _deallocate(self, server: ServerConnection, name: str, stmt: prepared.Statement) -> bytes:
        """SQL ``DEALLOCATE name`` of a protocol-level statement: the server knows it by its
        proxy-wide name, so it deallocates that. A server that lacks it first gets an empty
        statement under that name: a Parse of the real text could fail (a dropped table) and
        make the server skip the Query, leaving the client without its ReadyForQuery."""
        del self.statements[name]
        self._sub_statements.pop(name, None)
        unit = server.flow.sent
        out = b""
        if stmt.server_name not in server.statements:
            server.replies.expect(m.PARSE_COMPLETE, True, unit)
            out = m.parse(stmt.server_name, "", [])
        server.statements.discard(stmt.server_name)
        server.replies.expect_error(stmt.server_name, _renamer(stmt.server_name, name), unit)
        return out + m.query("DEALLOCATE " + session_params.quote_ident(stmt.server_name))

    def _inspect_parse(self, server: ServerConnection, body: bytes) -> bytes | None:
        name, tail_at = ("", 1) if body[:1] == b"\0" else m.read_cstring(body, 0)
        tail = body[tail_at:]
        unit = server.flow.sent
        replies = server.replies
        effects: list[sql.Subscription | sql.SettingEffect] = []
        notifies = False
        text_end = body.find(b"\0", tail_at)
        if text_end < 0:
            raise m.ProtocolError("missing string terminator")
        if precheck.might_matter(body[tail_at:text_end]):
            text, _ = m.read_cstring(body, tail_at)
            for effect in sql.session_effects(text) or ():
                if isinstance(effect, sql.SessionState):
                    if self._unsupported_state(effect):
                        # the server drops it before parsing
                        server.statements.unnamed, server.statements.unnamed_unit = None, unit
                        return self._provoke_error(server, effect, m.parse("", _PROVOKE, []))
                elif isinstance(
                    effect, sql.Listen | sql.Unlisten | sql.SetParameter | sql.ResetAll
                ):
                    effects.append(effect)
            notifies = sql.may_notify(text)
        if effects or notifies:
            if any(isinstance(e, sql.Listen | sql.Unlisten) for e in effects):
                server.needs_unlisten = True
            self._sub_statements[name] = (effects, notifies)
        elif self._sub_statements:
            self._sub_statements.pop(name, None)
        if not name:
            self._unnamed = server.statements.unnamed = tail
            server.statements.unnamed_unit = unit
            replies.expect(m.PARSE_COMPLETE, False, unit)
            return None
        stmt = self.statements.get(name)
        if stmt is not None:
            # Already exists: make the server raise its own 42P05, in the client's words.
            out = self._ensure_prepared(server, stmt, unit)
            replies.expect_error(stmt.server_name, _renamer(stmt.server_name, name), unit)
        else:
            if len(self.statements) >= prepared.MAX_CLIENT_STATEMENTS:
                raise fatal(
                    errors.PROGRAM_LIMIT_EXCEEDED,
                    f"too many prepared statements (pgproxy keeps at most "
                    f"{prepared.MAX_CLIENT_STATEMENTS} per client)",
                )
            stmt = self.statements[name] = prepared.statement_for(tail)
            if stmt.server_name in server.statements:
                out = m.close("S", stmt.server_name)  # re-parse: the server answers itself
                replies.expect(m.CLOSE_COMPLETE, True, unit)
            else:
                out = self._evict(server, server.statements.add(stmt.server_name), unit)
        replies.expect(m.PARSE_COMPLETE, False, unit)
        return out + stmt.parse_message()

    def _unsupported_state(self, effect: sql.SessionState) -> bool:
        """Session state transaction pooling cannot carry: log it, or (True) refuse it."""
        policy = self.proxy.config.proxy.unsupported_session_state
        if policy == "error":
            return True
        if policy == "log":
            self._log_unsupported_state(effect)
        return False

    def _log_unsupported_state(self, effect: sql.SessionState) -> None:
        if effect.what not in self._state_logged:
            self._state_logged.add(effect.what)
            log.warning(
                "%r: %s will not follow this client to other servers (transaction pooling)",
                self,
                effect.what,
            )

    def _provoke_error(
        self, server: ServerConnection, effect: sql.SessionState, message: bytes
    ) -> bytes:
        """Refuse a statement where it stands: the server fails a stand-in for it (so the
        transaction aborts exactly as the statement's own error would), reworded as ours."""
        error = PgError(
            errors.FEATURE_NOT_SUPPORTED,
            f"{effect.what} is not supported in transaction pooling mode",
            hint="Use a transaction-scoped alternative (pg_advisory_xact_lock, ON COMMIT DROP) "
            "or session pool_mode for this database.",
        )
        server.replies.expect_error(_PROVOKE, lambda _: error.fields(), server.flow.sent)
        return message

    def _ensure_unnamed(self, server: ServerConnection, unit: int) -> bytes:
        """Before a Bind/Describe of the unnamed statement: make the server's one this
        client's (it may hold another client's, or none, since the last Sync)."""
        tail = self._unnamed
        # Trusted only if set in this unit (skipped together with this message, if at all)
        # or in a unit that is over (an error there would have marked it unknown).
        cache = server.statements
        settled = cache.unnamed_unit == unit or cache.unnamed_unit < server.flow.done
        if settled and cache.unnamed is tail:  # identity: this client's very Parse, or None
            return b""
        cache.unnamed_unit = unit
        if tail is None:
            # The client has none: make sure the server fails as Postgres would (26000).
            server.replies.expect(m.CLOSE_COMPLETE, True, unit)
            cache.unnamed = None
            return m.close("S", "")
        server.replies.expect(m.PARSE_COMPLETE, True, unit)
        cache.unnamed = tail
        return m.message(m.PARSE, b"\0" + tail)

    def _ensure_prepared(
        self, server: ServerConnection, stmt: prepared.Statement, unit: int
    ) -> bytes:
        """The Parse to inject before using ``stmt`` on ``server``, if it lacks it."""
        if stmt.server_name in server.statements:
            return b""
        out = self._evict(server, server.statements.add(stmt.server_name), unit)
        server.replies.expect(m.PARSE_COMPLETE, True, unit)
        return out + stmt.parse_message()

    @staticmethod
    def _evict(server: ServerConnection, names: list[str], unit: int) -> bytes:
        for _ in names:
            server.replies.expect(m.CLOSE_COMPLETE, True, unit)
        return b"".join(m.close("S", name) for name in names)

    def _note_notify(self, server: ServerConnection) -> None:
        """A statement that may NOTIFY is being forwarded: attribute its notifications."""
        self._may_have_notified = self.may_stall = True
        pool = self.pool
        listener = self.proxy.existing_listener(pool) if pool is not None else None
        if listener is not None and listener.channels:
            listener.map_pid(server.pid, self.vpid)
            self._pid_mapped = (listener, server.pid)

    def _unmap_pid(self) -> None:
        if self._pid_mapped is not None:
            listener, pid = self._pid_mapped
            listener.unmap_pid(pid, self.vpid)
            self._pid_mapped = None

    def _savepoint_op(self, op: sql.SavepointOp) -> None:
        """Keep pending LISTEN effects in step with savepoints (names may repeat: the most
        recent one counts; ROLLBACK TO keeps its savepoint, RELEASE drops it and later ones)."""
        if isinstance(op, sql.Savepoint):
            self._savepoints.append((op.name, len(self._sub_pending), len(self._sub_held)))
            return
        for i in range(len(self._savepoints) - 1, -1, -1):
            name, pending_len, held_len = self._savepoints[i]
            if name != op.name:
                continue
            if isinstance(op, sql.Release):
                del self._savepoints[i:]
            else:
                del self._savepoints[i + 1 :]
                del self._sub_pending[pending_len:]
                if self._listener is not None:
                    for channel in self._sub_held[held_len:]:
                        self._listener.unhold(channel)
                del self._sub_held[held_len:]
            return

    def _add_pending(
        self, server: ServerConnection, effects: Sequence[sql.Subscription | sql.SettingEffect]
    ) -> None:
        """Effects that take hold when the transaction running them commits."""
        self._sub_pending += effects
        server.watch_tags = True
        for effect in effects:
            if isinstance(effect, sql.Listen):
                assert self.pool is not None
                listener = self._listener = self.proxy.listener_for(self.pool)
                # LISTEN upstream now, so it is live before this client's COMMIT returns.
                listener.hold(effect.channel)
                self._sub_held.append(effect.channel)

    def wants_stall(self, status: int) -> bool:
        """Hold a ReadyForQuery I after a possible NOTIFY until a listener fence completes.

        Directly connected, a session gets its own notifications before that ReadyForQuery,
        and their PID is its own; the fence makes both true through the proxy.
        """
        stall = self._wants_stall(status)
        self.may_stall = self._may_have_notified or self._fence_done
        return stall

    def _wants_stall(self, status: int) -> bool:
        if self._fence_done:
            self._fence_done = False
            return False
        if status != m.IDLE or not self._may_have_notified:
            return False
        self._may_have_notified = False
        server, pool = self.server, self.pool
        listener = self.proxy.existing_listener(pool) if pool is not None else None
        if server is None or listener is None or not listener.channels:
            self._unmap_pid()
            return False  # nobody listens on this database: nothing to attribute or deliver
        self._pid_mapped = None  # the fence unmaps it when it ends
        self.proxy.spawn(self._fence(listener.fence(server.pid, self.vpid), server))
        return True

    async def _fence(self, fence: Coroutine[Any, Any, None], server: ServerConnection) -> None:
        try:
            await fence
        except (PgError, ConnectionError) as exc:
            log.warning("%r: listener fence failed: %s", self, exc)
        self._fence_done = self.may_stall = True
        server.resume_stream()

    def command_complete(self, tag: bytes) -> None:
        if tag.startswith((b"DEALLOCATE ALL", b"DISCARD ALL")):
            self.statements.clear()
            self._sub_statements.clear()
        if tag.startswith(b"COMMIT"):
            self._apply_pending()  # also COMMIT AND CHAIN, which stays in a transaction
        elif tag.startswith(b"ROLLBACK"):
            self._sub_rollback = True

    def error_seen(self) -> None:
        self._sub_error = True

    def _settle_pending(self, status: int) -> None:
        """At ReadyForQuery: an implicit transaction ended, or an explicit one rolled back."""
        if status == m.IDLE:
            if self._sub_rollback or self._sub_error:
                self._drop_pending()
            else:
                self._apply_pending()
            if self.server is not None:
                self.server.watch_tags = False
        # ROLLBACK TO SAVEPOINT also says ROLLBACK but stays in the transaction: the effects
        # wait for the real outcome (those made after the savepoint are kept: a known limit).
        self._sub_rollback = self._sub_error = False

    def _apply_pending(self) -> None:
        self._apply_settings()
        listener = self._listener
        if listener is not None and any(
            isinstance(e, sql.Listen | sql.Unlisten) for e in self._sub_pending
        ):
            wanted = sql.apply_effects(listener.channels_of(self), self._sub_pending)
            listener.set_channels(self, wanted)
            not_live = listener.pending_readiness(wanted)
            if not_live:
                # Acknowledge only what is true: the COMMIT's reply waits for the listener.
                self.hold_output()
                self.proxy.spawn(self._release_when_live(not_live))
        self._drop_pending()

    def _apply_settings(self) -> None:
        """Committed session SETs of unreported parameters follow the client to other servers
        (reported ones already do, through ParameterStatus)."""
        server = self.server
        reported = {k.lower(): k for k in self.reported}
        changed = False
        for effect in self._sub_pending:
            if isinstance(effect, sql.ResetAll):
                changed = True
                self.unreported = dict(self._startup_unreported)
                if server is not None:
                    server.proxy_set.clear()  # the server is back at its own defaults
                self._resets.update(self._startup_reported)
            elif isinstance(effect, sql.SetParameter) and effect.name in reported:
                # The server reports the value itself; only the last RESET or SET of a name
                # counts, and a RESET is corrected in on_ready, after the server's own
                # ParameterStatus (sent just before its ReadyForQuery).
                if effect.statement is None:
                    self._resets.add(reported[effect.name])
                else:
                    self._resets.discard(reported[effect.name])
            elif isinstance(effect, sql.SetParameter):
                changed = True
                name = effect.name
                if effect.statement is not None:
                    self.unreported[name] = effect.statement
                    if server is not None:
                        server.proxy_set[name] = effect.statement
                else:
                    startup = self._startup_unreported.get(name)
                    if startup is not None:
                        self.unreported[name] = startup
                    else:
                        self.unreported.pop(name, None)
                    if server is not None:
                        server.proxy_set.pop(name, None)
        if changed:
            self._param_state = self._text_rules_ok = None
            if server is not None:
                server.param_state = None  # its proxy_set changed, and maybe not to agree

    def _reset_reported(self, name: str) -> None:
        """RESET of a reported parameter: the client's default is its startup value, which the
        pooled server does not know; correct what the server reported."""
        startup = self._startup_reported.get(name)
        if startup is not None and self.reported.get(name) != startup:
            self.reported[name] = startup
            self._param_fixes[name] = startup

    async def _release_when_live(self, waits: list[asyncio.Future[None]]) -> None:
        results = await asyncio.gather(*(asyncio.shield(w) for w in waits), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("%r: a committed LISTEN is not live upstream yet: %s", self, result)
        self.release_output()

    def _drop_pending(self) -> None:
        listener = self._listener
        if listener is not None:
            for name in self._sub_held:
                listener.unhold(name)
        self._sub_held.clear()
        self._sub_pending.clear()

    def notify(self, data: bytes) -> None:
        """Notifications for this client (whole NotificationResponses, in order): written now
        if it is between transactions, else held until its transaction ends."""
        if self.closed or self._doomed is not None:
            return
        if self._logged_in and self.server is None and not self._waiting and not self._skipping:
            # Only a client whose earlier output is still queued can be a slow reader (and
            # only then is the setting looked up: this runs per client per notification).
            queued = self.transport.get_write_buffer_size()
            if queued and queued + len(data) > self.proxy.config.proxy.notify_buffer_size:
                log.warning("%r: not reading notifications; disconnecting", self)
                self.write(m.error_response(_overflow("it is not reading them").fields()))
                self.reset()  # its buffer will never drain: do not wait for it
                return
            self.write(data)
            return
        self._notify_queue.append(data)
        self._notify_queued += len(data)
        if self._notify_queued > self.proxy.config.proxy.notify_pending_limit:
            log.warning("%r: too many notifications held during a transaction", self)
            self._notify_queue.clear()
            self.fail(_overflow("it stayed inside a transaction while they piled up"))

    def listener_lost(self, error: PgError) -> None:
        """The listener connection died: notifications may have been lost in the gap."""
        if self.proxy.config.proxy.listener_loss == "keep":
            return
        doom = fatal(
            error.sqlstate if error.sqlstate[:2] in ("08", "57") else errors.CONNECTION_FAILURE,
            f"pgproxy lost its listener connection: {error.message}",
            hint="notifications sent meanwhile may be lost; reconnect and read the current state",
        )
        self._notify_queue.clear()
        if self.server is None and not self._waiting:
            self.fail(doom)
        else:
            self._doomed = doom  # ends at its next ReadyForQuery I, not mid-transaction

    def _end_doomed(self) -> None:
        if self._doomed is not None:
            self.fail(self._doomed)

    # --- timers and cancel -------------------------------------------------------------------

    def _cancel_idle_tx_timer(self) -> None:
        if self._idle_tx_timer is not None:
            self._idle_tx_timer.cancel()
            self._idle_tx_timer = None

    def _idle_transaction_expired(self) -> None:
        self._idle_tx_timer = None
        server, self.server = self.server, None
        if server is not None:
            server.pool.close_server(server)
        self.fail(
            fatal(
                errors.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
        )

    def matches_secret(self, secret: bytes) -> bool:
        return hmac.compare_digest(self.secret, secret)

    def cancel_waiting(self) -> bool:
        """A cancel for a client still queued for a server: drop its request (57014)."""
        request = self._request
        if not self._waiting or request is None or request.done:
            return False
        request.cancel()
        self._waiting = False
        self._fail_unit(PgError(errors.QUERY_CANCELED, "canceling statement due to user request"))
        return True


def _subscription_tags(statements: list[sql.Subscription]) -> bytes:
    """The CommandCompletes Postgres sends for a Query of LISTEN/UNLISTEN statements."""
    return b"".join(
        m.command_complete("LISTEN" if isinstance(st, sql.Listen) else "UNLISTEN")
        for st in statements
    )


def _overflow(why: str) -> PgError:
    return fatal(
        errors.OUT_OF_MEMORY,
        "pgproxy: notification buffer overflow, disconnecting",
        detail=f"Notifications for this session exceeded the proxy's buffer because {why}.",
    )


async def _clean_and_release(server: ServerConnection, statements: list[str]) -> None:
    pool = server.pool
    try:
        for sql in statements:
            result = await server.run_internal(sql)
            if result.error is not None:
                raise result.error
    except (PgError, ConnectionError) as exc:
        log.info("%r: cleanup failed (%s); closing", server, exc)
        pool.close_server(server)
        return
    pool.release(server)
