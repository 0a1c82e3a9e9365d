"""Checkers for single configuration values, upstream URLs included.

Each takes one raw value (as TOML, the environment or an argument gave it) and the key path to
blame, and returns the typed value or raises :class:`ConfigError`. The rule: every message
starts with that key path and never echoes a secret (a password, or a URL that may hold one),
because it ends up on a terminal or in a log. Whole sections and rules spanning several keys
are ``validate.py``'s.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast, get_args
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pgproxy.config.schema import (
    DEFAULT_UPSTREAM_HOST,
    DEFAULT_UPSTREAM_PORT,
    MASK,
    ConfigError,
    PoolMode,
    is_secret_param,
)


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


def check_keys(table: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
    for key in table:
        if key not in allowed:
            msg = f"{path}: unknown key {key!r}"
            close = difflib.get_close_matches(key, list(allowed), n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            raise ConfigError(msg)


def as_table(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a table (got {_describe(value)})")
    return cast(Mapping[str, Any], value)


def as_str(value: object, path: str, *, secret: bool = False, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string (got {_describe(value, secret=secret)})")
    if not empty_ok and not value:
        raise ConfigError(f"{path}: must not be empty")
    return value


def as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: must be true or false (got {_describe(value)})")
    return value


def as_int(value: object, path: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    # bool is a subclass of int; `pool_size = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: must be an integer (got {_describe(value)})")
    if maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(f"{path}: must be between {minimum} and {maximum} (got {value})")
    if value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum} (got {value})")
    return value


def as_names(value: object, path: str) -> tuple[str, ...]:
    """A list of names: a TOML array of strings, or one string of comma-separated names (as
    PgBouncer writes ``admin_users``); blanks around names are dropped."""
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(f"{path}: must be a list of names (got {_describe(value)})")
    names: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{index}]: must be a string (got {_describe(item)})")
        name = item.strip()
        if name and name not in names:
            names.append(name)
        elif not name and isinstance(value, list):
            raise ConfigError(f"{path}[{index}]: must not be empty")
    return tuple(names)


def as_seconds(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: must be a number of seconds (got {_describe(value)})")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{path}: must be a finite number >= 0 (got {value!r})")
    return seconds


def as_choice(
    value: object, path: str, choices: Collection[str], *, ignore_case: bool = False
) -> str:
    text = value.lower() if ignore_case and isinstance(value, str) else value
    if not isinstance(text, str) or text not in choices:
        options = ", ".join(repr(c) for c in choices)
        got = repr(value) if isinstance(value, str) else _describe(value)
        raise ConfigError(f"{path}: must be one of {options} (got {got})")
    return text


def as_pool_mode(value: object, path: str) -> PoolMode:
    return cast(PoolMode, as_choice(value, path, get_args(PoolMode)))


_LISTEN_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def parse_listen(value: object, path: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[IPV6]:PORT``; bare IPv6 is rejected as ambiguous."""
    text = as_str(value, path)
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


def as_host(value: object, path: str) -> str:
    """A host name or IP address to listen on, bare (IPv6 without brackets)."""
    host = as_str(value, path, empty_ok=False)
    ok = not any(c.isspace() or c in "[]/" for c in host)
    if ok and ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            ok = False
    if not ok:
        raise ConfigError(f"{path}: must be a host name or an IP address (got {host!r})")
    return host


_SCRAM_RE = re.compile(
    r"SCRAM-SHA-256\$([0-9]+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)"
)


def check_scram_verifier(password: str, path: str) -> None:
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


MAX_WORKERS = 1024


def as_workers(value: object, path: str) -> int:
    """``workers``: an integer 1..MAX_WORKERS, or ``"auto"`` for one per CPU."""
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    if isinstance(value, str):
        raise ConfigError(f"{path}: must be an integer or 'auto' (got {_describe(value)})")
    return as_int(value, path, minimum=1, maximum=MAX_WORKERS)


# --------------------------------------------------------------------------- URLs


# libpq's target_session_attrs and load_balance_hosts (libpq-connect.html, "Parameter Key Words").
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE = ("disable", "random")

_HOST_ITEM_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\],]*))(?::(?P<port>[^,]*))?")


@dataclass(frozen=True)
class ParsedUrl:
    host: str  # the first of ``hosts``
    port: int
    dbname: str | None
    user: str | None
    password: str | None
    params: Mapping[str, str]
    masked: str
    hosts: tuple[tuple[str, int], ...] = ()  # every (host, port), in the URL's order
    target_session_attrs: str = "any"
    load_balance_hosts: str = "disable"


def _port(text: str, path: str) -> int | None:
    """A port as libpq takes it: empty means the default."""
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,5}", text):
        raise ConfigError(f"{path}: URL has an invalid port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{path}: URL port must be between 1 and 65535 (got {port})")
    return port


def _host_list(hostport: str, path: str) -> list[tuple[str | None, int | None]]:
    """``h1:5432,[::1]:5433,h3`` (the netloc after any userinfo) as (host, port) pairs."""
    out: list[tuple[str | None, int | None]] = []
    for item in hostport.split(","):
        m = _HOST_ITEM_RE.fullmatch(item)
        if m is None:
            raise ConfigError(f"{path}: URL has an invalid host list")
        host = m.group("v6") if m.group("v6") is not None else unquote(m.group("host"))
        out.append((host or None, _port(m.group("port") or "", path)))
    return out


def _check_host(host: str | None, path: str) -> None:
    if host is not None and "%" in host:
        raise ConfigError(f"{path}: URL host must not contain '%' (IPv6 zones are not supported)")
    if host is not None and host.startswith("/") and "\0" in host:
        raise ConfigError(f"{path}: URL socket directory must not contain NUL")


def _hosts(
    netloc_hosts: list[tuple[str | None, int | None]],
    params: dict[str, str],
    path: str,
) -> tuple[tuple[str, int], ...]:
    """Every (host, port), as libpq pairs them: ``host=``/``port=`` query parameters override
    the URI's; a single port applies to every host, otherwise there must be one per host."""
    hosts = [h for h, _ in netloc_hosts]
    ports = [p for _, p in netloc_hosts]
    if "host" in params:
        hosts = [h or None for h in params.pop("host").split(",")]
        ports = [None] * len(hosts) if len(ports) != len(hosts) else ports
    if "port" in params:
        given = [_port(p, path) for p in params.pop("port").split(",")]
        if len(given) == 1:
            ports = given * len(hosts)
        elif len(given) == len(hosts):
            ports = given
        else:
            raise ConfigError(f"{path}: URL has {len(hosts)} hosts but {len(given)} ports")
    for host in hosts:
        _check_host(host, path)
    return tuple(
        (host or DEFAULT_UPSTREAM_HOST, port or DEFAULT_UPSTREAM_PORT)
        for host, port in zip(hosts, ports, strict=True)
    )


def parse_url(url: str, path: str) -> ParsedUrl:
    """Parse a libpq URI, several hosts included.  Messages never echo the URL: it may hold
    a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{path}: not a valid URL") from None
    if parts.scheme not in ("postgresql", "postgres") or not url.partition(":")[2].startswith("//"):
        got = f" (got scheme {parts.scheme!r})" if parts.scheme else ""
        raise ConfigError(f"{path}: must be a 'postgresql://' or 'postgres://' URL{got}")
    if parts.fragment or url.endswith("#"):
        raise ConfigError(f"{path}: URL must not contain '#' (percent-encode it as %23)")
    hostport = parts.netloc.rpartition("@")[2]
    if "," in hostport:
        netloc_hosts = _host_list(hostport, path)
    else:
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{path}: URL has an invalid port") from None
        host = parts.hostname or None
        if hostport[:3].lower() == "%2f":  # libpq's percent-encoded socket directory
            host = unquote(hostport.partition(":")[0])
        if port is not None and not 1 <= port <= 65535:
            raise ConfigError(f"{path}: URL port must be between 1 and 65535 (got {port})")
        netloc_hosts = [(host, port)]
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
    hosts = _hosts(netloc_hosts, params, path)
    if "user" in params:
        user = params.pop("user") or None
    if "dbname" in params:
        dbname = params.pop("dbname") or None
    if "password" in params:
        password = params.pop("password") or None
    attrs = as_choice(
        params.get("target_session_attrs", "any"), f"{path}: target_session_attrs", SESSION_ATTRS
    )
    balance = as_choice(
        params.get("load_balance_hosts", "disable"), f"{path}: load_balance_hosts", LOAD_BALANCE
    )

    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = parts.query
    if any(is_secret_param(name) for name, _ in pairs):
        query = urlencode([(n, MASK if is_secret_param(n) else v) for n, v in pairs], safe="*")
    masked = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")

    return ParsedUrl(
        host=hosts[0][0],
        port=hosts[0][1],
        dbname=dbname,
        user=user,
        password=password,
        params=params,
        masked=masked,
        hosts=hosts,
        target_session_attrs=attrs,
        load_balance_hosts=balance,
    )
