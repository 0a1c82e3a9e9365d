"""What a configuration is: option types, defaults and the frozen dataclasses built from them.

Owns :class:`Config` and its parts (:class:`ProxySettings`, :class:`DatabaseConfig`,
:class:`UserConfig`), :class:`ConfigError` and the defaults. The rule: nothing here reads a file,
the environment or raw TOML, and nothing here checks a value; ``validate.py`` checks everything
once before a ``Config`` is made, so the rest of the proxy can trust one without re-checking it.
Reprs mask every password, because configs end up in logs.

No ``from __future__ import annotations`` here: ``validate.py`` reads the field types of
:class:`ProxySettings` at runtime (``int``, ``Literal[...]``), which must stay objects, not strings.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import quote

from pgproxy.auth.hba import HbaRule

PoolMode = Literal["session", "transaction"]
ListenerLossPolicy = Literal["disconnect", "keep"]
SessionStatePolicy = Literal["log", "error", "ignore"]
TlsMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
AuthType = Literal["trust", "md5", "scram-sha-256"]
LogFormat = Literal["text", "json"]

DEFAULT_UPSTREAM_URL = "postgresql://127.0.0.1:5432"
DEFAULT_UPSTREAM_PORT = 5432
DEFAULT_UPSTREAM_HOST = "127.0.0.1"
WILDCARD = "*"
# The admin console's virtual databases (pgproxy.admin): never routed upstream, so no
# [databases] entry may take these names and the "*" wildcard never matches them.
CONSOLE_DATABASES = ("pgbouncer", "pgproxy")
# Settings a running process cannot change: its sockets are bound once, its workers started.
RESTART_FIELDS = (
    "listen_host", "listen_port", "unix_socket_dir", "unix_socket_mode", "workers", "so_reuseport",
    "metrics_listen",
)  # fmt: skip

MASK = "***"  # what a secret shows as: in reprs and in masked URLs (values.py)

# Schema-qualified names and operators, so no search_path can redirect it (CVE-2025-12819's
# class); pg_shadow lists LOGIN roles only, and expired (VALID UNTIL) ones are left out.
DEFAULT_AUTH_QUERY = (
    "SELECT usename, passwd FROM pg_catalog.pg_shadow"
    " WHERE usename OPERATOR(pg_catalog.=) $1"
    " AND (valuntil IS NULL OR valuntil OPERATOR(pg_catalog.>) pg_catalog.now())"
)


class ConfigError(Exception):
    """Invalid or unreadable configuration; the message names the key path (never secrets)."""


@dataclass(frozen=True)
class ProxySettings:
    """The ``[proxy]`` section.

    In TOML the address is given as ``listen = "HOST:PORT"``; it is split into
    ``listen_host``/``listen_port`` here.  Other keys map 1:1 onto fields, so adding a
    field (int/float/str/bool/Literal) is enough to make it configurable.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 6432
    # Also listen on the unix-domain socket <dir>/.s.PGSQL.<port>, as Postgres names it
    # ("" = no unix socket); its file mode, like PgBouncer's unix_socket_mode.
    unix_socket_dir: str = ""
    unix_socket_mode: int = 0o777
    # The operators' HTTP listener (/healthz, /readyz, /metrics), "HOST:PORT"; "" = none.
    metrics_listen: str = ""
    # /metrics also has series per LISTEN channel (one label value per channel name).
    metrics_channel_labels: bool = False
    pool_mode: PoolMode = "transaction"
    max_client_conn: int = 1000
    default_pool_size: int = 20
    min_pool_size: int = 0
    query_wait_timeout: float = 120.0
    client_login_timeout: float = 60.0
    idle_transaction_timeout: float = 0.0
    # SIGTERM / SHUTDOWN: how long a drain waits for clients to reach a transaction boundary
    # before cancelling what they run and closing them.
    shutdown_timeout: float = 30.0
    so_reuseport: bool = False  # share the listen port with another pgproxy (rolling restart)
    paused: bool = False  # declarative PAUSE of every database (reloadable)
    server_connect_timeout: float = 15.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    server_reset_query: str = "DISCARD ALL"
    auth_type: AuthType = "trust"
    log_level: str = "info"
    log_format: LogFormat = "text"  # "json": one object per line (pgproxy.ops.logs)
    log_stats_period: float = 60.0  # seconds between "stats:" log lines; 0 = none
    notify_buffer_size: int = 1024 * 1024
    notify_pending_limit: int = 16 * 1024 * 1024
    listener_loss: ListenerLossPolicy = "disconnect"
    listener_ping_interval: float = 30.0
    listener_ping_timeout: float = 10.0
    max_prepared_statements: int = 200
    # Seconds between checks of the config file for a change (its resolved path, inode, size
    # or mtime: a ConfigMap update swaps a symlink), which reloads as SIGHUP does; 0 = off.
    config_watch_interval: float = 5.0
    unsupported_session_state: SessionStatePolicy = "log"
    client_tls_mode: TlsMode = "disable"
    client_tls_cert_file: str = ""
    client_tls_key_file: str = ""
    client_tls_ca_file: str = ""
    server_tls_mode: TlsMode = "prefer"
    server_tls_ca_file: str = ""
    auth_user: str = ""  # runs auth_query for users not in [users]; "" = no lookups
    auth_query: str = DEFAULT_AUTH_QUERY
    # Database auth_query runs in; "" = the entry's upstream database ("postgres" for "*").
    auth_dbname: str = ""
    auth_query_cache_ttl: float = 60.0
    auth_failure_delay: float = 0.0  # seconds before a failed login is answered (auth_delay)
    workers: int = 1  # processes sharing the listen port (pgproxy.workers); "auto" = CPUs
    # The admin console (database "pgbouncer" or "pgproxy"): users who may run everything,
    # and users who may only SHOW; everyone else is refused.
    admin_users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    stats_period: int = 60  # seconds between the readings SHOW STATS' averages compare


def is_secret_param(name: str) -> bool:
    """Whether a URL query parameter holds a secret (``password``, ``sslpassword`` ...)."""
    return "password" in name.lower()


def _masked_repr(obj: object) -> str:
    """dataclass-style repr that hides passwords, so configs can be logged safely."""
    shown: list[str] = []
    for f in dataclasses.fields(cast(Any, obj)):
        value = getattr(obj, f.name)
        if f.name == "password" and value is not None:
            text = repr(MASK)
        elif f.name == "url_params":
            text = repr({k: MASK if is_secret_param(k) else v for k, v in value.items()})
        else:
            text = repr(value)
        shown.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class DatabaseConfig:
    """One ``[databases.NAME]`` entry: where a client database name is proxied to.

    Defaults exist so other code and tests can build one directly; ``url`` is derived
    from host/port/dbname when left empty.
    """

    name: str
    host: str
    port: int
    dbname: str | None = None
    user: str | None = None
    password: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    pool_mode: PoolMode | None = None
    url: str = ""
    url_params: Mapping[str, str] = field(default_factory=dict, hash=False)
    auth_user: str | None = None  # overrides proxy.auth_user for this database
    # Every (host, port) of a multi-host URL, in its order; ``host``/``port`` are the first.
    hosts: tuple[tuple[str, int], ...] = ()
    target_session_attrs: str = "any"  # libpq's meanings (pgproxy.pool.targets)
    load_balance_hosts: str = "disable"  # "random": try the hosts in a random order

    def __post_init__(self) -> None:
        object.__setattr__(self, "url_params", MappingProxyType(dict(self.url_params)))
        if not self.hosts:
            object.__setattr__(self, "hosts", ((self.host, self.port),))
        if not self.url:
            path = "/" + quote(self.dbname, safe="") if self.dbname else ""
            if self.host.startswith("/"):  # a unix socket directory, as libpq writes it
                url = f"postgresql://{quote(self.host, safe='')}:{self.port}{path}"
            else:
                host = f"[{self.host}]" if ":" in self.host else self.host
                url = f"postgresql://{host}:{self.port}{path}"
            object.__setattr__(self, "url", url)

    def __repr__(self) -> str:
        return _masked_repr(self)


@dataclass(frozen=True)
class UserConfig:
    """One ``[users.NAME]`` entry: client credentials and per-user pool overrides."""

    name: str
    password: str | None = None
    pool_mode: PoolMode | None = None
    pool_size: int | None = None

    def __repr__(self) -> str:
        return _masked_repr(self)


@dataclass(frozen=True)
class Config:
    """The complete, validated configuration."""

    proxy: ProxySettings
    databases: Mapping[str, DatabaseConfig] = field(hash=False)
    users: Mapping[str, UserConfig] = field(default_factory=dict, hash=False)
    source: Path | None = None
    hba: tuple[HbaRule, ...] = ()  # [[hba]] access rules, first match wins

    def __post_init__(self) -> None:
        # Read-only views: a Config is shared by every connection task.
        object.__setattr__(self, "databases", MappingProxyType(dict(self.databases)))
        object.__setattr__(self, "users", MappingProxyType(dict(self.users)))

    def database_for(self, name: str) -> DatabaseConfig | None:
        """The entry for client database ``name``: exact match, else ``"*"``, else None (and
        always None for the admin console's names, which are never routed upstream)."""
        db = self.databases.get(name)
        if db is not None or name in CONSOLE_DATABASES:
            return db
        return self.databases.get(WILDCARD)

    def pool_mode_for(self, db: DatabaseConfig, user: str) -> PoolMode:
        """User override beats database override beats the proxy default."""
        user_cfg = self.users.get(user)
        if user_cfg is not None and user_cfg.pool_mode is not None:
            return user_cfg.pool_mode
        if db.pool_mode is not None:
            return db.pool_mode
        return self.proxy.pool_mode

    def pool_size_for(self, db: DatabaseConfig, user: str) -> int:
        """User override beats database override beats ``proxy.default_pool_size``."""
        user_cfg = self.users.get(user)
        if user_cfg is not None and user_cfg.pool_size is not None:
            return user_cfg.pool_size
        if db.pool_size is not None:
            return db.pool_size
        return self.proxy.default_pool_size

    def min_pool_size_for(self, db: DatabaseConfig) -> int:
        """Database override, else ``proxy.min_pool_size``; validated <= pool_size_for()."""
        return db.min_pool_size if db.min_pool_size is not None else self.proxy.min_pool_size
