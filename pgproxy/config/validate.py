"""A TOML-shaped document, plus overrides, turned into a :class:`Config`: every section checked.

Owns the sections (``[proxy]``, ``[databases.*]``, ``[users.*]``, ``[[hba]]``), the keys each
allows, and the rules that span keys (a pool's minimum against its size, auth_user needing a
password method). The rule: this is the only way to a ``Config`` from raw data, it reads no
file and no environment (``loading.py`` does, and hands over :class:`Overrides`), and every
error names the offending key path, written as it would be in TOML.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pgproxy import tls
from pgproxy.auth import hba
from pgproxy.auth.hba import HbaRule
from pgproxy.config.schema import (
    CONSOLE_DATABASES,
    DEFAULT_AUTH_QUERY,
    DEFAULT_UPSTREAM_URL,
    WILDCARD,
    Config,
    ConfigError,
    DatabaseConfig,
    ProxySettings,
    UserConfig,
)
from pgproxy.config.values import (
    as_bool,
    as_choice,
    as_host,
    as_int,
    as_names,
    as_pool_mode,
    as_seconds,
    as_str,
    as_table,
    as_workers,
    check_keys,
    check_scram_verifier,
    parse_listen,
    parse_url,
)

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


_SECTIONS = ("proxy", "databases", "users", "hba")
_LISTEN_FIELDS = ("listen_host", "listen_port")
# Lower bounds for integer proxy settings; the rest default to >= 0.
_PROXY_MINIMUMS = {
    "max_client_conn": 1,
    "default_pool_size": 1,
    "max_prepared_statements": 1,
    "stats_period": 1,
}
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
class Overrides:
    """Values from the environment / arguments, each with the label errors should use."""

    listen: tuple[str, str] | None = None
    upstream: tuple[str, str] | None = None
    pool_mode: tuple[str, str] | None = None
    # From the environment (environment.py), over the file and under the fields above:
    proxy: tuple[tuple[str, object, str], ...] = ()  # (setting, value, variable)
    databases: tuple[tuple[str, str, str], ...] = ()  # (database, url, label)


def _proxy_value(name: str, typ: Any, value: object, path: str) -> object:
    if name == "workers":
        return as_workers(value, path)
    if name == "listen_port":  # from PGPROXY_LISTEN_PORT; a file writes listen = "HOST:PORT"
        return as_int(value, path, maximum=65535)
    if name == "listen_host":
        return as_host(value, path)
    if get_origin(typ) is Literal:
        return as_choice(value, path, get_args(typ))
    if typ is bool:
        return as_bool(value, path)
    if typ == tuple[str, ...]:
        return as_names(value, path)
    if name == "unix_socket_mode":  # TOML writes it 0o777
        return as_int(value, path, maximum=0o777)
    if typ is int:
        return as_int(value, path, minimum=_PROXY_MINIMUMS.get(name, 0))
    if typ is float:
        return as_seconds(value, path)
    if typ is str:
        if name == "log_level":
            return as_choice(value, path, _LOG_LEVELS, ignore_case=True)
        if name == "metrics_listen":
            text = as_str(value, path)
            if text:
                parse_listen(text, path)  # checked now; split where it is bound
            return text
        return as_str(value, path)
    raise TypeError(f"ProxySettings.{name}: unsupported field type {typ!r}")


def _parse_proxy(table: Mapping[str, Any], overrides: Overrides) -> ProxySettings:
    types = {f.name: f.type for f in dataclasses.fields(ProxySettings)}
    check_keys(table, ["listen", *(name for name in types if name not in _LISTEN_FIELDS)], "proxy")

    values: dict[str, Any] = {}
    for name, value in table.items():
        if name == "listen":
            values["listen_host"], values["listen_port"] = parse_listen(value, "proxy.listen")
        else:
            values[name] = _proxy_value(name, types[name], value, _key("proxy", name))
    for name, value, label in overrides.proxy:
        values[name] = _proxy_value(name, types[name], value, label)
    if overrides.listen is not None:
        text, label = overrides.listen
        values["listen_host"], values["listen_port"] = parse_listen(text, label)
    if overrides.pool_mode is not None:
        text, label = overrides.pool_mode
        values["pool_mode"] = as_pool_mode(text, label)

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
    check_keys(table, _DATABASE_KEYS, path)
    if "url" not in table:
        raise ConfigError(f"{_key('databases', name, 'url')}: required key is missing")
    url_path = url_label or _key("databases", name, "url")
    parsed = parse_url(as_str(table["url"], url_path, secret=True), url_path)

    user = parsed.user
    if "user" in table:
        user = as_str(table["user"], _key("databases", name, "user"), empty_ok=False)
    password = parsed.password
    if "password" in table:
        password = as_str(table["password"], _key("databases", name, "password"), secret=True)
    pool_size = None
    if "pool_size" in table:
        pool_size = as_int(table["pool_size"], _key("databases", name, "pool_size"), minimum=1)
    min_pool_size = None
    if "min_pool_size" in table:
        min_pool_size = as_int(table["min_pool_size"], _key("databases", name, "min_pool_size"))
    pool_mode = None
    if "pool_mode" in table:
        pool_mode = as_pool_mode(table["pool_mode"], _key("databases", name, "pool_mode"))
    auth_user = None
    if "auth_user" in table:
        auth_user = as_str(table["auth_user"], _key("databases", name, "auth_user"))

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

    _check_tls_negotiation(parsed.params, proxy, url_path)
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
        hosts=parsed.hosts,
        target_session_attrs=parsed.target_session_attrs,
        load_balance_hosts=parsed.load_balance_hosts,
    )


def _check_tls_negotiation(params: Mapping[str, str], proxy: ProxySettings, path: str) -> None:
    """``sslnegotiation`` as libpq 17 takes it: direct TLS only where TLS is required."""
    negotiation = params.get("sslnegotiation", "postgres")
    if negotiation not in ("postgres", "direct"):
        raise ConfigError(f"{path}: sslnegotiation must be 'postgres' or 'direct'")
    mode = params.get("sslmode", proxy.server_tls_mode)
    if negotiation == "direct" and not tls.upstream_requires_tls(mode):
        raise ConfigError(
            f"{path}: weak sslmode {mode!r} may not be used with sslnegotiation=direct "
            "(use require, verify-ca or verify-full)"
        )


def _parse_user(
    name: str, table: Mapping[str, Any], proxy: ProxySettings, dbs: Mapping[str, DatabaseConfig]
) -> UserConfig:
    path = _key("users", name)
    check_keys(table, _USER_KEYS, path)
    password = None
    if "password" in table:
        pw_path = _key("users", name, "password")
        password = as_str(table["password"], pw_path, secret=True, empty_ok=False)
        if password.startswith("SCRAM-SHA-256$"):
            check_scram_verifier(password, pw_path)
    pool_mode = None
    if "pool_mode" in table:
        pool_mode = as_pool_mode(table["pool_mode"], _key("users", name, "pool_mode"))
    pool_size = None
    if "pool_size" in table:
        size_path = _key("users", name, "pool_size")
        pool_size = as_int(table["pool_size"], size_path, minimum=1)
        # This user's pools must still be able to hold each database's minimum.
        for db in dbs.values():
            if db.min_pool_size is not None:
                minimum, label = db.min_pool_size, _key("databases", db.name, "min_pool_size")
            else:
                minimum, label = proxy.min_pool_size, "proxy.min_pool_size"
            if pool_size < minimum:
                raise ConfigError(f"{size_path}: must be >= {label} ({minimum}) (got {pool_size})")
    return UserConfig(name=name, password=password, pool_mode=pool_mode, pool_size=pool_size)


def build(data: Mapping[str, Any], source: Path | None, overrides: Overrides) -> Config:
    for section in data:
        if section not in _SECTIONS:
            raise ConfigError(
                f"{_key(section)}: unknown section "
                "(expected 'proxy', 'databases', 'users' or 'hba')"
            )
    proxy = _parse_proxy(as_table(data.get("proxy", {}), "proxy"), overrides)

    db_tables: dict[str, Mapping[str, Any]] = {}
    for name, table in as_table(data.get("databases", {}), "databases").items():
        if not name:
            raise ConfigError('databases."": database name must not be empty')
        if name in CONSOLE_DATABASES:
            raise ConfigError(
                f"{_key('databases', name)}: {name!r} is the admin console's database and is "
                "never routed upstream; give the upstream database another name here"
            )
        db_tables[name] = as_table(table, _key("databases", name))
    url_labels: dict[str, str] = {}
    for name, url, label in overrides.databases:
        db_tables[name] = {**db_tables.get(name, {}), "url": url}
        url_labels[name] = label
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
    for name, table in as_table(data.get("users", {}), "users").items():
        if not name:
            raise ConfigError('users."": user name must not be empty')
        users[name] = _parse_user(name, as_table(table, _key("users", name)), proxy, databases)

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


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document (no environment, no defaults file)."""
    return build(data, source, Overrides())
