"""The proxy process: accepts clients, owns the pools, routes cancels, reaps, reloads.

Virtual backend PIDs are allocated above Linux' largest ``pid_max`` (2^22) so that a client's
PID can never equal a real backend PID (PROTOCOL-NOTES 23); secrets are random and compared in
constant time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pgproxy import tls
from pgproxy.backend import UpstreamTls
from pgproxy.config import Config, ConfigError, load_config
from pgproxy.frontend import ClientSession
from pgproxy.pool.pool import Pool, PoolSettings
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.pubsub.listener import Listener
from pgproxy.wire import log

_VPID_BASE = 1 << 22
_VPID_SPAN = (1 << 31) - 1 - _VPID_BASE
_JANITOR_INTERVAL = 1.0


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[tuple[str, str], Pool] = {}
        self.listeners: dict[tuple[str, int, str], Listener] = {}  # per upstream database
        self.clients: dict[int, ClientSession] = {}  # by virtual pid, logged-in clients
        self.client_count = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._janitor: asyncio.Task[None] | None = None
        self._next_vpid = secrets.randbelow(_VPID_SPAN)
        self._sessions: set[ClientSession] = set()
        self.client_tls = _client_tls(config)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.config.proxy
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSession(self),
            settings.listen_host,
            settings.listen_port,
            reuse_address=True,
            backlog=4096,
        )
        self._janitor = loop.create_task(self._janitor_loop())
        log.info("pgproxy listening on %s:%d (%s mode)", settings.listen_host, self.port,
                 settings.pool_mode)  # fmt: skip

    @property
    def port(self) -> int:
        assert self._server is not None
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._janitor is not None:
            self._janitor.cancel()
        bye = m.error_response(
            PgError(
                errors.ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
                severity="FATAL",
            ).fields()
        )
        for client in list(self._sessions):
            client.write(bye)
            client.close()
        for listener in self.listeners.values():
            await listener.close()
        for pool in self.pools.values():
            await pool.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- clients -----------------------------------------------------------------------------

    def client_opened(self, client: ClientSession) -> None:
        self.client_count += 1
        self._sessions.add(client)

    def client_closed(self, client: ClientSession) -> None:
        self.client_count -= 1
        self._sessions.discard(client)
        if self.clients.get(client.vpid) is client:
            del self.clients[client.vpid]

    def register(self, client: ClientSession) -> tuple[int, bytes]:
        """A fresh (virtual pid, secret) for a client that has logged in."""
        while True:
            self._next_vpid = (self._next_vpid + 1) % _VPID_SPAN
            vpid = _VPID_BASE + self._next_vpid
            if vpid not in self.clients:
                break
        self.clients[vpid] = client
        return vpid, secrets.token_bytes(4)

    def cancel(self, request: m.CancelRequest) -> None:
        """Forward a cancel to the server the client holds now, and nowhere else."""
        client = self.clients.get(request.pid)
        if client is None or not client.matches_secret(request.secret):
            log.info("cancel request for unknown backend %d ignored", request.pid)
            return
        if client.cancel_waiting():
            return
        server = client.server
        if server is None or server.flow.idle:
            return
        server.cancels_in_flight += 1
        self.spawn(self._send_cancel(server.pool, server.pid, server.secret, server))

    async def _send_cancel(self, pool: Pool, pid: int, secret: bytes, server: Any) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(pool.database.host, pool.database.port),
                pool.settings.connect_timeout or None,
            )
            writer.write(m.cancel_request(pid, secret))
            await writer.drain()
            await asyncio.wait_for(reader.read(), 10)  # the server closes when done
            writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("cancel to %s:%d failed: %s", pool.database.host, pool.database.port, exc)
        finally:
            server.cancels_in_flight -= 1

    # --- pools -------------------------------------------------------------------------------

    def pool_for(self, database: str, user: str) -> Pool:
        """The pool for a client's (database, user); FATAL 3D000 if the config has no route."""
        pool = self.pools.get((database, user))
        if pool is not None and not pool.closing:
            return pool
        pool = self._new_pool(database, user)
        if pool is None:
            raise PgError(
                errors.INVALID_CATALOG_NAME,
                f'database "{database}" does not exist',
                severity="FATAL",
            )
        self.pools[(database, user)] = pool
        if pool.settings.min_size:
            self.spawn(pool.warm_up())
        return pool

    @staticmethod
    def _listener_key(pool: Pool) -> tuple[str, int, str]:
        """Notifications are per upstream database: one listener per (host, port, dbname)."""
        return (pool.database.host, pool.database.port, pool.upstream_db)

    def existing_listener(self, pool: Pool) -> Listener | None:
        return self.listeners.get(self._listener_key(pool))

    def listener_for(self, pool: Pool) -> Listener:
        """The listener of the upstream database ``pool`` connects to (made on first use)."""
        db = pool.database
        key = self._listener_key(pool)
        listener = self.listeners.get(key)
        if listener is None:
            settings = PoolSettings(
                size=1,
                min_size=0,
                mode="transaction",
                connect_timeout=self.config.proxy.server_connect_timeout,
                idle_timeout=0,
                lifetime=0,
                reset_query="",
                tls=pool.settings.tls,
            )
            startup = {
                "application_name": "pgproxy-listener",
                "client_encoding": "UTF8",
                # A listener must never be timed out by the server (PROTOCOL-NOTES 35).
                "options": "-c idle_session_timeout=0 -c statement_timeout=0",
            }
            listener_pool = Pool(
                f"listener:{pool.upstream_db}",
                db,
                pool.upstream_db,
                pool.upstream_user,
                pool.password,
                settings,
                startup,
            )
            listener = self.listeners[key] = Listener(listener_pool)
        return listener

    def _new_pool(self, database: str, user: str) -> Pool | None:
        config = self.config
        db = config.database_for(database)
        if db is None:
            return None
        password = db.password
        if password is None:
            user_cfg = config.users.get(user)
            if user_cfg is not None and user_cfg.password and not _is_verifier(user_cfg.password):
                password = user_cfg.password
        proxy = config.proxy
        tls_mode = db.url_params.get("sslmode", proxy.server_tls_mode)
        tls_context = tls.client_side_context(
            tls_mode, db.url_params.get("sslrootcert", proxy.server_tls_ca_file)
        )
        settings = PoolSettings(
            size=config.pool_size_for(db, user),
            min_size=config.min_pool_size_for(db),
            mode=config.pool_mode_for(db, user),
            connect_timeout=proxy.server_connect_timeout,
            idle_timeout=proxy.server_idle_timeout,
            lifetime=proxy.server_lifetime,
            reset_query=proxy.server_reset_query,
            max_prepared_statements=proxy.max_prepared_statements,
            tls=None
            if tls_context is None
            else UpstreamTls(tls_context, tls.upstream_requires_tls(tls_mode)),
        )
        return Pool(
            f"{database}/{user}", db, db.dbname or database, db.user or user, password, settings
        )

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(_JANITOR_INTERVAL)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                pool.reap(now)
                if pool.settings.min_size and pool.total < pool.settings.min_size:
                    self.spawn(pool.warm_up())

    def reload(self, config: Config) -> None:
        """Apply a new configuration: new logins use it; pools whose settings changed retire
        (idle servers close now, busy ones when their client lets go)."""
        self.client_tls = _client_tls(config)
        self.config = config
        for key, pool in list(self.pools.items()):
            fresh = self._new_pool(*key)
            if fresh is not None and fresh.same_route(pool):
                continue
            del self.pools[key]
            pool.retire()
        log.info("configuration reloaded from %s", config.source or "built-in defaults")


def _client_tls(config: Config) -> ssl.SSLContext | None:
    settings = config.proxy
    try:
        return tls.server_side_context(
            settings.client_tls_mode,
            settings.client_tls_cert_file,
            settings.client_tls_key_file,
            settings.client_tls_ca_file,
        )
    except (tls.TlsConfigError, OSError, ssl.SSLError) as exc:
        raise ConfigError(f"proxy.client_tls_*: {exc}") from exc


def _is_verifier(password: str) -> bool:
    return password.startswith("SCRAM-SHA-256$") or (
        len(password) == 35 and password.startswith("md5")
    )


def run(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run the proxy until SIGINT/SIGTERM; SIGHUP calls ``reload`` for a fresh config."""
    logging.basicConfig(
        level=config.proxy.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvloop

    return int(uvloop.run(_serve(config, reload or (lambda: load_config(config.source)))))


async def _serve(config: Config, load: Callable[[], Config]) -> int:
    try:
        proxy = Proxy(config)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    try:
        await proxy.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.proxy.listen_host,
                  config.proxy.listen_port, exc)  # fmt: skip
        return 1
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def reload() -> None:
        try:
            proxy.reload(load())
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    await proxy.stop()
    return 0
