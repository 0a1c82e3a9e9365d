"""Configuration loading and validation.

Settings come from, lowest to highest precedence: built-in defaults, a TOML file,
``PGPROXY_*`` environment variables and explicit arguments (the CLI).  Everything is
validated here, once, so the rest of the proxy can trust a ``Config`` without
re-checking it.  Error messages always start with the offending key path and never
contain a password, because they end up on terminals and in logs.
"""

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args, get_origin
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pgproxy.auth import hba
from pgproxy.auth.hba import HbaRule

__all__ = [
    "DEFAULT_UPSTREAM_URL",
    "ENV_CONFIG",
    "ENV_LISTEN",
    "ENV_UPSTREAM",
    "AuthType",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "PoolMode",
    "ProxySettings",
    "UserConfig",
    "load_config",
    "parse_config",
]

PoolMode = Literal["session", "transaction"]
ListenerLossPolicy = Literal["disconnect", "keep"]
SessionStatePolicy = Literal["log", "error", "ignore"]
TlsMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
AuthType = Literal["trust", "md5", "scram-sha-256"]

DEFAULT_UPSTREAM_URL = "postgresql://127.0.0.1:5432"
DEFAULT_UPSTREAM_PORT = 5432
DEFAULT_UPSTREAM_HOST = "127.0.0.1"
WILDCARD = "*"

ENV_CONFIG = "PGPROXY_CONFIG"
ENV_LISTEN = "PGPROXY_LISTEN"
ENV_UPSTREAM = "PGPROXY_UPSTREAM"

_MASK = "***"

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
    pool_mode: PoolMode = "transaction"
    max_client_conn: int = 1000
    default_pool_size: int = 20
    min_pool_size: int = 0
    query_wait_timeout: float = 120.0
    client_login_timeout: float = 60.0
    idle_transaction_timeout: float = 0.0
    server_connect_timeout: float = 15.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    server_reset_query: str = "DISCARD ALL"
    auth_type: AuthType = "trust"
    log_level: str = "info"
    notify_buffer_size: int = 1024 * 1024
    notify_pending_limit: int = 16 * 1024 * 1024
    listener_loss: ListenerLossPolicy = "disconnect"
    listener_ping_interval: float = 30.0
    listener_ping_timeout: float = 10.0
    max_prepared_statements: int = 200
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


def _is_secret_param(name: str) -> bool:
    return "password" in name.lower()


def _masked_repr(obj: object) -> str:
    """dataclass-style repr that hides passwords, so configs can be logged safely."""
    shown: list[str] = []
    for f in dataclasses.fields(cast(Any, obj)):
        value = getattr(obj, f.name)
        if f.name == "password" and value is not None:
            text = repr(_MASK)
        elif f.name == "url_params":
            text = repr({k: _MASK if _is_secret_param(k) else v for k, v in value.items()})
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "url_params", MappingProxyType(dict(self.url_params)))
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
        """The entry for client database ``name``: exact match, else ``"*"``, else None."""
        db = self.databases.get(name)
        return db if db is not None else self.databases.get(WILDCARD)

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


# --------------------------------------------------------------------------- helpers

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(*parts: str) -> str:
    """Render a key path the way it would be written in TOML (quoting e.g. ``"*"``)."""
    rendered = []
    for part in parts:
        if _BARE_KEY.fullmatch(part):
            rendered.append(part)
        else:
            rendered.append('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return ".".join(rendered)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _describe(value: object, *, secret: bool = False) -> str:
    """'integer 5', "string 'x'", 'boolean true' -- just the type when secret."""
    if secret or isinstance(value, Mapping | list):
        return _type_name(value)
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    return f"{_type_name(value)} {value!r}"


def _check_keys(table: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
    for key in table:
        if key not in allowed:
            msg = f"{path}: unknown key {key!r}"
            close = difflib.get_close_matches(key, list(allowed), n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            raise ConfigError(msg)


def _as_table(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a table (got {_describe(value)})")
    return cast(Mapping[str, Any], value)


def _as_str(value: object, path: str, *, secret: bool = False, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string (got {_describe(value, secret=secret)})")
    if not empty_ok and not value:
        raise ConfigError(f"{path}: must not be empty")
    return value


def _as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: must be true or false (got {_describe(value)})")
    return value


def _as_int(value: object, path: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    # bool is a subclass of int; `pool_size = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: must be an integer (got {_describe(value)})")
    if maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(f"{path}: must be between {minimum} and {maximum} (got {value})")
    if value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum} (got {value})")
    return value


def _as_seconds(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: must be a number of seconds (got {_describe(value)})")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{path}: must be a finite number >= 0 (got {value!r})")
    return seconds


def _as_choice(
    value: object, path: str, choices: Collection[str], *, ignore_case: bool = False
) -> str:
    text = value.lower() if ignore_case and isinstance(value, str) else value
    if not isinstance(text, str) or text not in choices:
        options = ", ".join(repr(c) for c in choices)
        got = repr(value) if isinstance(value, str) else _describe(value)
        raise ConfigError(f"{path}: must be one of {options} (got {got})")
    return text


def _as_pool_mode(value: object, path: str) -> PoolMode:
    return cast(PoolMode, _as_choice(value, path, get_args(PoolMode)))


_LISTEN_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def _parse_listen(value: object, path: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[IPV6]:PORT``; bare IPv6 is rejected as ambiguous."""
    text = _as_str(value, path)
    m = _LISTEN_RE.fullmatch(text)
    host = (m.group("v6") or m.group("host")) if m else ""
    if m is None or not host or any(c.isspace() for c in host):
        hint = " (put IPv6 addresses in brackets)" if text.count(":") > 1 else ""
        raise ConfigError(f"{path}: must be 'HOST:PORT' or '[IPV6]:PORT' (got {text!r}){hint}")
    if m.group("v6") is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{path}: {host!r} is not an IPv6 address") from None
    port = int(m.group("port"))
    if port > 65535:
        raise ConfigError(f"{path}: port must be between 0 and 65535 (got {port})")
    return host, port


_SCRAM_RE = re.compile(
    r"SCRAM-SHA-256\$([0-9]+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)"
)


def _check_scram_verifier(password: str, path: str) -> None:
    """Catch mangled verifiers at startup rather than as mysterious login failures."""
    m = _SCRAM_RE.fullmatch(password)
    # Length first: int() of a >4300-digit string raises ValueError (and 2**31 - 1 is the max).
    ok = m is not None and len(m.group(1)) <= 10 and 1 <= int(m.group(1)) < 2**31
    if m is not None and ok:
        try:
            base64.b64decode(m.group(2), validate=True)
            keys = [base64.b64decode(m.group(i), validate=True) for i in (3, 4)]
            ok = all(len(k) == 32 for k in keys)
        except (binascii.Error, ValueError):
            ok = False
    if not ok:
        raise ConfigError(
            f"{path}: malformed SCRAM-SHA-256 verifier "
            "(expected 'SCRAM-SHA-256$<iterations>:<salt>$<storedkey>:<serverkey>')"
        )


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class _ParsedUrl:
    host: str
    port: int
    dbname: str | None
    user: str | None
    password: str | None
    params: Mapping[str, str]
    masked: str


def _parse_url(url: str, path: str) -> _ParsedUrl:
    """Parse a libpq URI.  Messages never echo the URL: it may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{path}: not a valid URL") from None
    if parts.scheme not in ("postgresql", "postgres") or not url.partition(":")[2].startswith("//"):
        got = f" (got scheme {parts.scheme!r})" if parts.scheme else ""
        raise ConfigError(f"{path}: must be a 'postgresql://' or 'postgres://' URL{got}")
    if parts.fragment or url.endswith("#"):
        raise ConfigError(f"{path}: URL must not contain '#' (percent-encode it as %23)")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{path}: URL has an invalid port") from None
    host = parts.hostname or None
    hostport = parts.netloc.rpartition("@")[2]
    if hostport[:3].lower() == "%2f":  # libpq's percent-encoded socket directory
        host = unquote(hostport.partition(":")[0])
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    dbname = unquote(parts.path[1:]) if parts.path not in ("", "/") else None

    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError(f"{path}: URL has a malformed query string") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise ConfigError(f"{path}: URL query parameter {name!r} given twice")
        params[name] = value
    # Like libpq, these query parameters override the corresponding URI parts.
    if "host" in params:
        host = params.pop("host") or None
    if "port" in params:
        port_text = params.pop("port")
        if not re.fullmatch(r"[0-9]{1,5}", port_text):
            raise ConfigError(f"{path}: URL has an invalid port")
        port = int(port_text)
    if "user" in params:
        user = params.pop("user") or None
    if "dbname" in params:
        dbname = params.pop("dbname") or None
    if "password" in params:
        password = params.pop("password") or None

    if port is None:
        port = DEFAULT_UPSTREAM_PORT
    if not 1 <= port <= 65535:
        raise ConfigError(f"{path}: URL port must be between 1 and 65535 (got {port})")
    if host is not None and "," in host:
        raise ConfigError(f"{path}: multiple hosts in one URL are not supported")
    if host is not None and "%" in host:
        raise ConfigError(f"{path}: URL host must not contain '%' (IPv6 zones are not supported)")
    if host is not None and host.startswith("/") and "\0" in host:
        raise ConfigError(f"{path}: URL socket directory must not contain NUL")

    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{hostport}"
    query = parts.query
    if any(_is_secret_param(name) for name, _ in pairs):
        query = urlencode([(n, _MASK if _is_secret_param(n) else v) for n, v in pairs], safe="*")
    masked = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")

    return _ParsedUrl(
        host=host or DEFAULT_UPSTREAM_HOST,
        port=port,
        dbname=dbname,
        user=user,
        password=password,
        params=params,
        masked=masked,
    )


# --------------------------------------------------------------------------- sections

_SECTIONS = ("proxy", "databases", "users", "hba")
_LISTEN_FIELDS = ("listen_host", "listen_port")
# Lower bounds for integer proxy settings; the rest default to >= 0.
_PROXY_MINIMUMS = {"max_client_conn": 1, "default_pool_size": 1, "max_prepared_statements": 1}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_DATABASE_KEYS = (
    "url",
    "user",
    "password",
    "pool_size",
    "min_pool_size",
    "pool_mode",
    "auth_user",
)
_USER_KEYS = ("password", "pool_mode", "pool_size")


@dataclass(frozen=True)
class _Overrides:
    """Values from the environment / arguments, each with the label errors should use."""

    listen: tuple[str, str] | None = None
    upstream: tuple[str, str] | None = None
    pool_mode: tuple[str, str] | None = None


MAX_WORKERS = 1024


def as_workers(value: object, path: str) -> int:
    """``workers``: an integer 1..MAX_WORKERS, or ``"auto"`` for one per CPU."""
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    if isinstance(value, str):
        raise ConfigError(f"{path}: must be an integer or 'auto' (got {_describe(value)})")
    return _as_int(value, path, minimum=1, maximum=MAX_WORKERS)


def _proxy_value(name: str, typ: Any, value: object, path: str) -> object:
    if name == "workers":
        return as_workers(value, path)
    if get_origin(typ) is Literal:
        return _as_choice(value, path, get_args(typ))
    if typ is bool:
        return _as_bool(value, path)
    if name == "unix_socket_mode":  # TOML writes it 0o777
        return _as_int(value, path, maximum=0o777)
    if typ is int:
        return _as_int(value, path, minimum=_PROXY_MINIMUMS.get(name, 0))
    if typ is float:
        return _as_seconds(value, path)
    if typ is str:
        if name == "log_level":
            return _as_choice(value, path, _LOG_LEVELS, ignore_case=True)
        return _as_str(value, path)
    raise TypeError(f"ProxySettings.{name}: unsupported field type {typ!r}")


def _parse_proxy(table: Mapping[str, Any], overrides: _Overrides) -> ProxySettings:
    types = {f.name: f.type for f in dataclasses.fields(ProxySettings)}
    for name in _LISTEN_FIELDS:
        del types[name]
    _check_keys(table, ["listen", *types], "proxy")

    values: dict[str, Any] = {}
    for name, value in table.items():
        if name == "listen":
            values["listen_host"], values["listen_port"] = _parse_listen(value, "proxy.listen")
        else:
            values[name] = _proxy_value(name, types[name], value, _key("proxy", name))
    if overrides.listen is not None:
        text, label = overrides.listen
        values["listen_host"], values["listen_port"] = _parse_listen(text, label)
    if overrides.pool_mode is not None:
        text, label = overrides.pool_mode
        values["pool_mode"] = _as_pool_mode(text, label)

    settings = ProxySettings(**values)
    if "$1" not in settings.auth_query:
        raise ConfigError("proxy.auth_query: must take the user name as $1")
    if settings.min_pool_size > settings.default_pool_size:
        raise ConfigError(
            f"proxy.min_pool_size: must be <= proxy.default_pool_size "
            f"({settings.default_pool_size}) (got {settings.min_pool_size})"
        )
    return settings


def _parse_database(
    name: str, table: Mapping[str, Any], proxy: ProxySettings, url_label: str | None
) -> DatabaseConfig:
    path = _key("databases", name)
    _check_keys(table, _DATABASE_KEYS, path)
    if "url" not in table:
        raise ConfigError(f"{_key('databases', name, 'url')}: required key is missing")
    url_path = url_label or _key("databases", name, "url")
    parsed = _parse_url(_as_str(table["url"], url_path, secret=True), url_path)

    user = parsed.user
    if "user" in table:
        user = _as_str(table["user"], _key("databases", name, "user"), empty_ok=False)
    password = parsed.password
    if "password" in table:
        password = _as_str(table["password"], _key("databases", name, "password"), secret=True)
    pool_size = None
    if "pool_size" in table:
        pool_size = _as_int(table["pool_size"], _key("databases", name, "pool_size"), minimum=1)
    min_pool_size = None
    if "min_pool_size" in table:
        min_pool_size = _as_int(table["min_pool_size"], _key("databases", name, "min_pool_size"))
    pool_mode = None
    if "pool_mode" in table:
        pool_mode = _as_pool_mode(table["pool_mode"], _key("databases", name, "pool_mode"))
    auth_user = None
    if "auth_user" in table:
        auth_user = _as_str(table["auth_user"], _key("databases", name, "auth_user"))

    size, size_label = proxy.default_pool_size, "proxy.default_pool_size"
    if pool_size is not None:
        size, size_label = pool_size, _key("databases", name, "pool_size")
    if min_pool_size is not None and min_pool_size > size:
        raise ConfigError(
            f"{_key('databases', name, 'min_pool_size')}: must be <= {size_label} ({size}) "
            f"(got {min_pool_size})"
        )
    if min_pool_size is None and proxy.min_pool_size > size:
        raise ConfigError(
            f"{_key('databases', name, 'pool_size')}: must be >= proxy.min_pool_size "
            f"({proxy.min_pool_size}) (got {size})"
        )

    return DatabaseConfig(
        name=name,
        host=parsed.host,
        port=parsed.port,
        dbname=parsed.dbname,
        user=user,
        password=password or None,
        pool_size=pool_size,
        min_pool_size=min_pool_size,
        pool_mode=pool_mode,
        url=parsed.masked,
        url_params=parsed.params,
        auth_user=auth_user,
    )


def _parse_user(
    name: str, table: Mapping[str, Any], proxy: ProxySettings, dbs: Mapping[str, DatabaseConfig]
) -> UserConfig:
    path = _key("users", name)
    _check_keys(table, _USER_KEYS, path)
    password = None
    if "password" in table:
        pw_path = _key("users", name, "password")
        password = _as_str(table["password"], pw_path, secret=True, empty_ok=False)
        if password.startswith("SCRAM-SHA-256$"):
            _check_scram_verifier(password, pw_path)
    pool_mode = None
    if "pool_mode" in table:
        pool_mode = _as_pool_mode(table["pool_mode"], _key("users", name, "pool_mode"))
    pool_size = None
    if "pool_size" in table:
        size_path = _key("users", name, "pool_size")
        pool_size = _as_int(table["pool_size"], size_path, minimum=1)
        # This user's pools must still be able to hold each database's minimum.
        for db in dbs.values():
            if db.min_pool_size is not None:
                minimum, label = db.min_pool_size, _key("databases", db.name, "min_pool_size")
            else:
                minimum, label = proxy.min_pool_size, "proxy.min_pool_size"
            if pool_size < minimum:
                raise ConfigError(f"{size_path}: must be >= {label} ({minimum}) (got {pool_size})")
    return UserConfig(name=name, password=password, pool_mode=pool_mode, pool_size=pool_size)


def _build(data: Mapping[str, Any], source: Path | None, overrides: _Overrides) -> Config:
    for section in data:
        if section not in _SECTIONS:
            raise ConfigError(
                f"{_key(section)}: unknown section "
                "(expected 'proxy', 'databases', 'users' or 'hba')"
            )
    proxy = _parse_proxy(_as_table(data.get("proxy", {}), "proxy"), overrides)

    db_tables: dict[str, Mapping[str, Any]] = {}
    for name, table in _as_table(data.get("databases", {}), "databases").items():
        if not name:
            raise ConfigError('databases."": database name must not be empty')
        db_tables[name] = _as_table(table, _key("databases", name))
    url_labels: dict[str, str] = {}
    if overrides.upstream is not None:
        url, label = overrides.upstream
        db_tables[WILDCARD] = {**db_tables.get(WILDCARD, {}), "url": url}
        url_labels[WILDCARD] = label
    elif not db_tables:
        db_tables[WILDCARD] = {"url": DEFAULT_UPSTREAM_URL}
    databases = {
        name: _parse_database(name, table, proxy, url_labels.get(name))
        for name, table in db_tables.items()
    }

    users: dict[str, UserConfig] = {}
    for name, table in _as_table(data.get("users", {}), "users").items():
        if not name:
            raise ConfigError('users."": user name must not be empty')
        users[name] = _parse_user(name, _as_table(table, _key("users", name)), proxy, databases)

    try:
        rules = hba.parse_rules(data.get("hba", []))
    except hba.HbaError as exc:
        raise ConfigError(str(exc)) from None
    _check_lookups_need_passwords(proxy, databases, rules)
    return Config(proxy=proxy, databases=databases, users=users, source=source, hba=rules)


def _check_lookups_need_passwords(
    proxy: ProxySettings,
    databases: Mapping[str, DatabaseConfig],
    rules: tuple[HbaRule, ...],
) -> None:
    """auth_user / auth_query only make sense where some login proves a password: with trust
    alone the looked-up secrets would never be checked, only mislead."""
    methods = {rule.method for rule in rules} if rules else {proxy.auth_type}
    if methods & set(hba.PASSWORD_METHODS):
        return
    keys = [_key("proxy", "auth_user")] if proxy.auth_user else []
    keys += [_key("databases", db.name, "auth_user") for db in databases.values() if db.auth_user]
    if proxy.auth_query != DEFAULT_AUTH_QUERY:  # the shipped example spells out the default
        keys.append(_key("proxy", "auth_query"))
    if keys:
        how = "proxy.auth_type" if not rules else "every [[hba]] rule"
        raise ConfigError(
            f"{keys[0]}: needs a password method (md5 or scram-sha-256), but {how} is "
            f"{' or '.join(repr(m) for m in sorted(methods))}: a trust login proves nothing, "
            "so looked-up secrets would never be checked"
        )


# --------------------------------------------------------------------------- entry points


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document (no environment, no defaults file)."""
    return _build(data, source, _Overrides())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (at byte {exc.start})") from None


def _pick(
    arg: str | None, arg_label: str, env: Mapping[str, str], var: str
) -> tuple[str, str] | None:
    if arg is not None:
        return arg, arg_label
    if env.get(var):
        return env[var], var
    return None


def load_config(
    path: Path | str | None = None,
    *,
    listen: str | None = None,
    upstream: str | None = None,
    pool_mode: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load defaults < TOML file < environment < keyword arguments.

    The file is ``path`` or else ``$PGPROXY_CONFIG``; with neither, only built-in
    defaults apply.  Keyword-argument errors are labelled with the matching CLI flag
    (``--listen`` ...) since that is where they normally come from.  Empty environment
    variables count as unset.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None and environ.get(ENV_CONFIG):
        path = environ[ENV_CONFIG]
    source = Path(path).expanduser() if path is not None else None
    data = _read_toml(source) if source is not None else {}
    overrides = _Overrides(
        listen=_pick(listen, "--listen", environ, ENV_LISTEN),
        upstream=_pick(upstream, "--upstream", environ, ENV_UPSTREAM),
        pool_mode=(pool_mode, "--pool-mode") if pool_mode is not None else None,
    )
    return _build(data, source, overrides)
