"""Access rules: which client may log in to which database as which user, and how.

Theory of operation. ``[[hba]]`` entries in the configuration work like the lines of Postgres'
``pg_hba.conf``: each names databases, users, client addresses and a method; the **first** rule
that matches a connection decides. With no rules at all, every connection gets the proxy's
``auth_type`` (the behaviour before rules existed); with at least one rule, a connection that
matches none is refused (default deny), as Postgres does::

    [[hba]]
    database = ["app", "reports"]   # or "all"
    user = "all"                    # or a name, or a list of names
    address = "10.0.0.0/8"          # CIDR, "local" (the unix socket), a list of them, or "all"
    method = "scram-sha-256"        # trust | md5 | scram-sha-256 | reject
    tls = true                      # optional: only TLS (true) / only plaintext (false) clients

Rules are checked before any password exchange, so ``reject`` and "no rule" cost nothing. This
module is pure (no I/O, no config import): :func:`parse_rules` validates the TOML values and
raises :class:`HbaError` naming the key, which ``config/validate.py`` reports as a ConfigError.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pgproxy.protocol.errors import INVALID_AUTHORIZATION_SPECIFICATION, fatal

METHODS = ("trust", "md5", "scram-sha-256", "reject")
PASSWORD_METHODS = ("md5", "scram-sha-256")
NAME_MAX_BYTES = 63  # NAMEDATALEN - 1: Postgres cuts startup user and database names here
_KEYS = ("database", "user", "address", "method", "tls")
_ALL = "all"
_LOCAL = "local"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HbaError(ValueError):
    """An invalid ``[[hba]]`` entry; the message starts with the key path."""


@dataclass(frozen=True)
class HbaRule:
    """One entry; ``None`` in a field means "all"."""

    databases: frozenset[str] | None
    users: frozenset[str] | None
    networks: tuple[Network, ...] | None
    method: str
    tls: bool | None = None
    local: bool = False  # "local" listed: matches unix-socket connections

    def matches(
        self, database: str, user: str, address: str | None, tls: bool, local: bool = False
    ) -> bool:
        if self.databases is not None and database not in self.databases:
            return False
        if self.users is not None and user not in self.users:
            return False
        if self.tls is not None and self.tls != tls:
            return False
        if self.networks is None:
            return True
        if local:
            return self.local
        ip = _ip(address)
        return ip is not None and any(
            ip.version == net.version and ip in net for net in self.networks
        )


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's ::ffff:10.1.2.3 is 10.1.2.3
    return ip


def decide(
    rules: Sequence[HbaRule],
    default_method: str,
    *,
    database: str,
    user: str,
    address: str | None,
    tls: bool,
    local: bool = False,
) -> str:
    """The authentication method for a connection, or a FATAL 28000 if it may not log in.

    ``local``: the client came through the unix-domain socket (``address`` is then None)."""
    if not rules:
        return default_method
    host = "[local]" if local else address or "unknown"
    where = f'host "{host}", user "{user}", database "{database}"'
    encryption = "TLS encryption" if tls else "no encryption"
    for rule in rules:
        if rule.matches(database, user, address, tls, local):
            if rule.method == "reject":
                raise fatal(
                    INVALID_AUTHORIZATION_SPECIFICATION,
                    f"pgproxy [[hba]] rule rejects connection for {where}, {encryption}",
                )
            return rule.method
    raise fatal(
        INVALID_AUTHORIZATION_SPECIFICATION, f"no pgproxy [[hba]] rule for {where}, {encryption}"
    )


def truncate_name(name: str) -> str:
    """``name`` cut to :data:`NAME_MAX_BYTES` bytes of UTF-8, as Postgres cuts startup names.

    Never splits a character: the cut backs off to the last whole one (a byte the client sent
    that is not UTF-8, kept as a ``surrogateescape`` code point, counts as one byte).
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= NAME_MAX_BYTES:
        return name
    size = 0
    for i, char in enumerate(name):
        size += len(char.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX_BYTES:
            return name[:i]
    return name  # not reached: the whole name is longer than the limit


# --------------------------------------------------------------------------- parsing


def parse_rules(value: object, path: str = "hba") -> tuple[HbaRule, ...]:
    """Validate the ``hba`` array of tables from the TOML document."""
    if not isinstance(value, list):
        raise HbaError(f"{path}: must be an array of tables ([[hba]] entries)")
    return tuple(_parse_rule(entry, f"{path}[{i}]") for i, entry in enumerate(value))


def _parse_rule(entry: object, path: str) -> HbaRule:
    if not isinstance(entry, Mapping):
        raise HbaError(f"{path}: must be a table")
    table: Mapping[str, Any] = entry
    for key in table:
        if key not in _KEYS:
            raise HbaError(f"{path}: unknown key {key!r} (expected one of {', '.join(_KEYS)})")
    for key in ("database", "user", "address", "method"):
        if key not in table:
            raise HbaError(f"{path}.{key}: required key is missing")
    method = table["method"]
    if method not in METHODS:
        shown = repr(method) if isinstance(method, str) else type(method).__name__
        raise HbaError(
            f"{path}.method: must be one of {', '.join(repr(m) for m in METHODS)} (got {shown})"
        )
    tls = table.get("tls")
    if tls is not None and not isinstance(tls, bool):
        raise HbaError(f"{path}.tls: must be true or false")
    networks, local = _addresses(table["address"], f"{path}.address")
    return HbaRule(
        databases=_names(table["database"], f"{path}.database"),
        users=_names(table["user"], f"{path}.user"),
        networks=networks,
        method=method,
        tls=tls,
        local=local,
    )


def _strings(value: object, path: str) -> list[str]:
    items: Iterable[object] = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise HbaError(f"{path}: must be a non-empty string or a list of them")
        out.append(item)
    if not out:
        raise HbaError(f'{path}: must not be an empty list (use "all")')
    return out


def _names(value: object, path: str) -> frozenset[str] | None:
    names = _strings(value, path)
    if _ALL in names:
        if len(names) > 1:
            raise HbaError(f'{path}: "all" cannot be combined with names')
        return None
    return frozenset(names)


def _addresses(value: object, path: str) -> tuple[tuple[Network, ...] | None, bool]:
    """(networks, whether "local" is listed); networks None = "all" (unix socket included)."""
    texts = _strings(value, path)
    if _ALL in texts:
        if len(texts) > 1:
            raise HbaError(f'{path}: "all" cannot be combined with addresses')
        return None, True
    local = _LOCAL in texts
    nets = []
    for text in texts:
        if text == _LOCAL:
            continue
        try:
            nets.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise HbaError(f"{path}: {text!r} is not a CIDR address ({exc})") from None
    return tuple(nets), local
