"""The proxy process: accepts clients, owns the pools, routes cancels, reaps, reloads.

It also serves what the admin console and /metrics show: ``snapshot()`` (pgproxy.admin.capture
reads it), with workers ``gather_snapshot()`` and ``everywhere()`` (pgproxy.admin.whole: the
whole proxy), and the readings its averages compare, taken every ``stats_period`` by a task
of its own.

Virtual backend PIDs are allocated above Linux' largest ``pid_max`` (2^22) so that a client's
PID can never equal a real backend PID (PROTOCOL-NOTES 23); secrets are random and compared in
constant time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from pgproxy import compiled, tls
from pgproxy.accept import TcpListener, bind_tcp
from pgproxy.admin import capture, whole
from pgproxy.admin.commands import Result
from pgproxy.admin.periods import StatsPeriods
from pgproxy.admin.snapshot import Snapshot
from pgproxy.auth import cbind
from pgproxy.auth.credentials import PassThroughStore, UpstreamSecret, is_verifier
from pgproxy.auth.query import AuthQuery
from pgproxy.backend import ServerConnection
from pgproxy.client.session import ClientSession
from pgproxy.config import RESTART_FIELDS, Config, ConfigError, DatabaseConfig
from pgproxy.control import Control
from pgproxy.ops.service import Operations
from pgproxy.pool.pool import Pool, PoolSettings, pool_of
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.pubsub.listener import Listener
from pgproxy.pubsub.registry import ListenerKey, listener_key, new_listener
from pgproxy.pubsub.siblings import Siblings
from pgproxy.server_open import UpstreamTls, send_cancel
from pgproxy.unixsocket import UnixListener, socket_path
from pgproxy.wire import log
from pgproxy.workers import peerwire
from pgproxy.workers.peers import Peers

_VPID_BASE = 1 << 22
_VPID_SPAN = (1 << 31) - 1 - _VPID_BASE
_JANITOR_INTERVAL = 1.0


class Proxy:
    # In a worker of a multi-process pgproxy (pgproxy.workers), set by serve.py before start():
    # the channel to the other workers, and the unix socket the supervisor bound.
    peers: Peers | None = None
    siblings: Siblings | None = None  # NOTIFY attribution across workers (with peers)
    inherited_unix: socket.socket | None = None
    # Set by serve.py: loads the configuration again as SIGHUP does (the console's RELOAD).
    loader: Callable[[], Config] | None = None

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[tuple[str, str], Pool] = {}
        self.listeners: dict[ListenerKey, Listener] = {}  # per upstream database
        self.clients: dict[int, ClientSession] = {}  # by virtual pid, logged-in clients
        self.client_count = 0
        self._tcp: TcpListener | None = None
        self._port = config.proxy.listen_port
        self._unix_server: asyncio.Server | None = None
        self._unix: UnixListener | None = None  # the socket file this process owns
        self._tasks: set[asyncio.Task[Any]] = set()
        self._janitor: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.periods = StatsPeriods(time.monotonic())
        self._next_vpid = secrets.randbelow(_VPID_SPAN)
        self._sessions: set[ClientSession] = set()
        self.client_tls = _client_tls(config)
        self.cert_binding = _cert_binding(config)  # SCRAM-SHA-256-PLUS channel binding data
        # Credentials learnt from logins, per (upstream host, port, user).
        self.pass_through = PassThroughStore()
        self.auth_query = AuthQuery(self._auth_pool)
        self.control = Control(self)  # drain, pause, resume, ... (console, signals, config)
        self.ops = Operations(self)  # health, metrics and stats lines (pgproxy.ops)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.config.proxy
        loop = asyncio.get_running_loop()
        # Workers share the port; so do two pgproxies with so_reuseport (a restart beside a
        # draining one). Our own accept path: it sees a direct-TLS ClientHello (pgproxy.accept).
        sockets = bind_tcp(
            settings.listen_host,
            settings.listen_port,
            reuse_port=self.peers is not None or settings.so_reuseport,
        )
        self._tcp = TcpListener(
            sockets,
            lambda: ClientSession(self),
            lambda: self.client_tls,
            lambda: self.config.proxy.client_login_timeout,
            self.spawn,
        )
        if settings.unix_socket_dir:
            sock = self.inherited_unix
            if sock is None:
                self._unix = UnixListener(
                    settings.unix_socket_dir, self.port, settings.unix_socket_mode
                )
                sock = self._unix.sock

            def local_client() -> ClientSession:
                return ClientSession(self, local=True)

            # From 3.13 the loop would unlink the file at close, also a worker's inherited one
            # that its siblings still serve: UnixListener (or the supervisor) owns the file.
            if sys.version_info >= (3, 13):
                self._unix_server = await loop.create_unix_server(
                    local_client, sock=sock, backlog=4096, cleanup_socket=False
                )
            else:
                self._unix_server = await loop.create_unix_server(
                    local_client, sock=sock, backlog=4096
                )
            log.info("pgproxy listening on %s", socket_path(settings.unix_socket_dir, self.port))
        self._janitor = loop.create_task(self._janitor_loop())
        self.control.apply_config(self.config)
        self._stats_task = loop.create_task(self._stats_loop())
        log.info("pgproxy listening on %s:%d (%s mode, %s)", settings.listen_host, self.port,
                 settings.pool_mode, "compiled" if compiled() else "pure Python")  # fmt: skip
        await self.ops.start(reuse_port=self.peers is not None)

    @property
    def port(self) -> int:
        """The port it listens on (before start(): the configured one; after a drain closed
        the socket: the one it had)."""
        if self._tcp is not None and self._tcp.sockets[0].fileno() >= 0:
            self._port = int(self._tcp.sockets[0].getsockname()[1])
        return self._port

    @property
    def draining(self) -> bool:
        return self.control.draining

    @property
    def sessions(self) -> Iterable[ClientSession]:
        return self._sessions

    def stop_accepting(self) -> None:
        """Close the TCP listening socket: with SO_REUSEPORT the kernel gives new connections
        to the other sockets on the port. The unix socket stays, for the admin console."""
        if self._tcp is not None:
            self._tcp.close()

    def login_refusal(self, database: str) -> PgError | None:
        return self.control.login_refusal(database)

    async def stop(self) -> None:
        await self.ops.stop()
        if self._tcp is not None:
            self._tcp.close()
            self._tcp.abort_waiting()
        if self._unix_server is not None:
            self._unix_server.close()
        if self._unix is not None:
            self._unix.close()
        for task in (self._janitor, self._stats_task):
            if task is not None:
                task.cancel()
        bye = m.error_response(
            PgError(
                errors.ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
                severity="FATAL",
            ).fields()
        )
        for client in list(self._sessions):
            client.end_reason = "admin"  # what its logout line says
            client.write(bye)
            client.close()
        for listener in self.listeners.values():
            await listener.close()
        for pool in self.pools.values():
            await pool.close()
        await self.auth_query.close()
        for task in list(self._tasks):
            task.cancel()
        if self._unix_server is not None:
            await self._unix_server.wait_closed()

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
        self.control.session_closed()

    def register(self, client: ClientSession) -> tuple[int, bytes]:
        """A fresh (virtual pid, secret) for a client that has logged in.

        Among N workers, worker i hands out ``base + serial * N + i`` (``vpid_owner``)."""
        index, count = self.worker
        span = _VPID_SPAN // count
        while True:
            self._next_vpid = (self._next_vpid + 1) % span
            vpid = _VPID_BASE + self._next_vpid * count + index
            if vpid not in self.clients:
                break
        self.clients[vpid] = client
        return vpid, secrets.token_bytes(client.key_length)

    def cancel(self, request: m.CancelRequest) -> None:
        """Route a cancel to the worker whose client it names (this one, without workers)."""
        peers = self.peers
        if peers is not None:
            owner = vpid_owner(request.pid, peers.count)
            if owner is not None and owner != peers.index:
                log.debug("cancel request for %d: forwarded to worker %d", request.pid, owner)
                self.spawn(peers.forward(owner, request))
                return
            log.debug("cancel request for %d: handled here", request.pid)
        self.cancel_here(request)

    def cancel_here(self, request: m.CancelRequest) -> None:
        """Forward a cancel to the server the client holds now, and nowhere else."""
        client = self.clients.get(request.pid)
        if client is None or not client.matches_secret(request.secret):
            log.info("cancel request for unknown backend %d ignored", request.pid)
            return
        if client.cancel_waiting():
            return
        server = client.server
        if server is not None and not server.flow.idle:
            self.cancel_server(server)

    def cancel_server(self, server: ServerConnection) -> None:
        """Ask Postgres to cancel what ``server`` is running."""
        pool = pool_of(server)
        server.cancels_in_flight += 1  # not reused before the cancel is through
        self.spawn(
            send_cancel(
                server,
                *server.address,  # the host it was opened on, of all the URL lists
                pool.settings.connect_timeout,
            )
        )

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
        if self.control.is_paused(database):
            pool.hold()
        if pool.settings.min_size:
            self.spawn(pool.warm_up())
        return pool

    def existing_listener(self, pool: Pool) -> Listener | None:
        return self.listeners.get(listener_key(pool))

    def listener_for(self, pool: Pool) -> Listener:
        """The listener of the upstream database ``pool`` connects to (made on first use)."""
        key = listener_key(pool)
        listener = self.listeners.get(key)
        if listener is None:
            listener = self.listeners[key] = new_listener(pool, self.config.proxy)
            listener.siblings = self.siblings
        return listener

    def _new_pool(self, database: str, user: str) -> Pool | None:
        config = self.config
        db = config.database_for(database)
        if db is None:
            return None
        password, pass_through = self._upstream_credentials(db, user)
        proxy = config.proxy
        settings = PoolSettings(
            size=config.pool_size_for(db, user),
            min_size=config.min_pool_size_for(db),
            mode=config.pool_mode_for(db, user),
            connect_timeout=proxy.server_connect_timeout,
            idle_timeout=proxy.server_idle_timeout,
            lifetime=proxy.server_lifetime,
            reset_query=proxy.server_reset_query,
            max_prepared_statements=proxy.max_prepared_statements,
            tls=self._upstream_tls(db),
        )
        pool = Pool(
            f"{database}/{user}",
            db,
            db.dbname or database,
            db.user or user,
            password,
            settings,
            pass_through=pass_through,
        )
        if self.siblings is not None:
            pool.server_opened, pool.server_closed = self.siblings.opened, self.siblings.closed
        return pool

    def _upstream_tls(self, db: DatabaseConfig) -> UpstreamTls | None:
        proxy = self.config.proxy
        tls_mode = db.url_params.get("sslmode", proxy.server_tls_mode)
        tls_context = tls.client_side_context(
            tls_mode, db.url_params.get("sslrootcert", proxy.server_tls_ca_file)
        )
        if tls_context is None:
            return None
        direct = db.url_params.get("sslnegotiation") == "direct"  # checked by the config
        return UpstreamTls(tls_context, tls.upstream_requires_tls(tls_mode), direct)

    def _upstream_credentials(
        self, db: DatabaseConfig, user: str
    ) -> tuple[str | None, Callable[[], UpstreamSecret | None] | None]:
        """(password, pass-through source) for a pool of client ``user`` on ``db``.

        A configured password wins (the database's, else the user's plain one); without one,
        a user logging in upstream as itself uses what its own logins taught the proxy (SCRAM
        pass-through, md5 hash): its secret is a verifier, in ``[users]`` or from auth_query.
        """
        if db.password is not None:
            return db.password, None
        user_cfg = self.config.users.get(user)
        secret = user_cfg.password if user_cfg is not None else None
        if secret and not is_verifier(secret):
            return secret, None
        if db.user is not None and db.user != user:
            return None, None  # a forced upstream user without a password (trust upstream)
        looked_up = user_cfg is None and bool(self.auth_query.auth_user(self.config, db))
        if not secret and not looked_up:
            return None, None  # no password anywhere: the upstream must trust this user
        store, key = self.pass_through, (db.host, db.port, user)  # what client/login.py learns
        return None, lambda: store.get(key)

    def _auth_pool(self, db: DatabaseConfig, dbname: str, auth_user: str) -> Pool:
        """A small pool for auth_query lookups; no client startup parameter reaches it."""
        proxy = self.config.proxy
        settings = PoolSettings(
            size=2,
            min_size=0,
            mode="transaction",
            connect_timeout=proxy.server_connect_timeout,
            idle_timeout=proxy.server_idle_timeout,
            lifetime=proxy.server_lifetime,
            reset_query="",
            tls=self._upstream_tls(db),
        )
        startup = {
            "application_name": "pgproxy-auth",
            "client_encoding": "UTF8",
            "options": "-c search_path=pg_catalog -c statement_timeout=10000",
        }
        password: str | None = db.password if db.user == auth_user else None
        pass_through = None
        if password is None:
            password, pass_through = self._upstream_credentials(
                dataclasses.replace(db, user=None, password=None), auth_user
            )
        return Pool(
            f"auth:{dbname}/{auth_user}",
            db,
            dbname,
            auth_user,
            password,
            settings,
            startup,
            pass_through=pass_through,
        )

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(_JANITOR_INTERVAL)
            now = time.monotonic()
            self.auth_query.reap(now)
            for pool in list(self.pools.values()):
                pool.reap(now)
                if pool.settings.min_size and pool.total < pool.settings.min_size:
                    self.spawn(pool.warm_up())

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.proxy.stats_period)
            self.periods.roll(list(self.pools.values()), time.monotonic())

    # --- the admin console -------------------------------------------------------------------

    @property
    def worker(self) -> tuple[int, int]:
        """(index, count) of this process among the workers ((0, 1) without workers)."""
        return (self.peers.index, self.peers.count) if self.peers is not None else (0, 1)

    def snapshot(self) -> Snapshot:
        return capture.take(self)

    async def gather_snapshot(self) -> Snapshot:
        """The whole proxy's snapshot: with workers, this one's and the others' merged."""
        own = self.snapshot()
        return own if self.peers is None else await whole.gather(own, self.peers)

    def everywhere(self, verb: str, arg: str) -> Awaitable[Result]:
        """A console control command run on every worker, answered once all have run it."""
        assert self.peers is not None
        return whole.everywhere(self.control, self.peers, verb, arg)

    def perform(self, verb: str, arg: str) -> Awaitable[str]:
        """A control command another worker's console sent here (``pgproxy.workers.peers``)."""
        return whole.here(self.control, verb, arg)

    def attribution(self, request: peerwire.Attribution) -> Awaitable[peerwire.Answer]:
        """NOTIFY attribution another worker asks for (``pgproxy.pubsub.siblings``)."""
        assert self.siblings is not None
        return self.siblings.answer(request)

    def reload_config(self) -> None:
        """The console's RELOAD: what SIGHUP does, with the error told to the caller."""
        if self.peers is not None:
            raise ConfigError(
                "with workers, RELOAD is not supported yet: send SIGHUP to the supervisor"
            )
        if self.loader is None:
            raise ConfigError("this pgproxy was started without a configuration to reload")
        self.reload(self.loader())

    def reload(self, config: Config) -> None:
        """Apply a new configuration: new logins use it; pools whose settings changed retire
        (idle servers close now, busy ones when their client lets go)."""
        old = self.config.proxy
        for name in RESTART_FIELDS:
            if getattr(config.proxy, name) != getattr(old, name):
                log.warning("proxy.%s takes effect when pgproxy restarts", name)
        self.client_tls = _client_tls(config)
        self.cert_binding = _cert_binding(config)
        self.config = config
        self.control.apply_config(config)
        # Secrets, auth_user and upstreams may all have changed: nothing learnt or looked up
        # under the old settings is trusted under the new ones.
        self.pass_through.clear()
        self.auth_query.reload()
        self.ops.reload()
        for key, pool in list(self.pools.items()):
            fresh = self._new_pool(*key)
            if fresh is not None and fresh.same_route(pool):
                continue
            del self.pools[key]
            pool.retire()
        log.info("configuration reloaded from %s", config.source or "built-in defaults")


def vpid_owner(vpid: int, workers: int) -> int | None:
    """The index of the worker that handed out virtual pid ``vpid`` (None: not a vpid)."""
    if not _VPID_BASE <= vpid < _VPID_BASE + _VPID_SPAN:
        return None
    return (vpid - _VPID_BASE) % workers


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


def _cert_binding(config: Config) -> bytes | None:
    settings = config.proxy
    if settings.client_tls_mode == "disable":
        return None
    return cbind.certificate_file_hash(settings.client_tls_cert_file)
