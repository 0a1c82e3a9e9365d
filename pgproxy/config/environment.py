"""Settings from the environment, as containers give them, and the table that documents them.

Owns the variable names (``PGPROXY_<SETTING>`` for every ``[proxy]`` setting, ``DATABASE_URL``
and ``DATABASE_URLS``), turning a variable's text into the value a TOML file would hold, and
the Markdown table README.md shows (``pgproxy --env-table``). The rule: the settings' variables,
their conversions and their rows come from the :class:`ProxySettings` fields alone, so a new
field has its variable without a line here (or a TypeError, and a failing test, if its type is
new); nothing here judges a value: what it converts goes through ``validate.py`` like a file's,
labelled with the variable's name, and text that does not convert is passed on as it is, for
the validator to reject by that name. Empty variables count as unset.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal, get_args, get_origin

from pgproxy.config.schema import DEFAULT_UPSTREAM_URL, WILDCARD, ConfigError, ProxySettings

PREFIX = "PGPROXY_"
ENV_CONFIG = "PGPROXY_CONFIG"
ENV_LISTEN = "PGPROXY_LISTEN"
ENV_UPSTREAM = "PGPROXY_UPSTREAM"
ENV_DATABASE_URL = "DATABASE_URL"
ENV_DATABASE_URLS = "DATABASE_URLS"

# Settings whose text is read differently from their type's: a file mode is octal (0777,
# 0o777 or 777), and workers may be "auto".
_OCTAL = frozenset({"unix_socket_mode"})
_AUTO = frozenset({"workers"})
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

# NAME=URL entries of DATABASE_URLS: a comma (or white space) ends one only where the next
# entry, NAME=SCHEME://, begins, so a comma inside a URL's query string stays part of it.
_URLS_SPLIT = re.compile(r"[,\s]+(?=[^,=\s/]+=[A-Za-z][A-Za-z0-9+.-]*://)")


def variable(setting: str) -> str:
    """The environment variable of ``[proxy]`` setting ``setting``."""
    return PREFIX + setting.upper()


def _fields() -> Iterator[dataclasses.Field[Any]]:
    return iter(dataclasses.fields(ProxySettings))


def _is_list(typ: Any) -> bool:
    return get_origin(typ) in (list, tuple)


def convert(name: str, typ: Any, text: str) -> object:
    """The value a TOML file would give setting ``name`` (of type ``typ``) for ``text``.

    Text that is not of the type comes back unchanged, for the validator to reject."""
    text = text.strip()
    if name in _AUTO and text == "auto":
        return text
    if name in _OCTAL:
        digits = text[2:] if text[:2].lower() == "0o" else text
        return int(digits, 8) if re.fullmatch(r"[0-7]+", digits) else text
    if typ is bool:
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if typ is int:
        return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else text
    if typ is float:
        try:
            return float(text)
        except ValueError:
            return text
    if typ is str or get_origin(typ) is Literal:
        return text
    if _is_list(typ):
        return [item.strip() for item in text.split(",") if item.strip()]
    raise TypeError(f"ProxySettings.{name}: no environment conversion for {typ!r}")


def proxy_values(env: Mapping[str, str]) -> tuple[tuple[str, object, str], ...]:
    """(setting, value, variable) for every ``PGPROXY_<SETTING>`` set in ``env``."""
    found = []
    for f in _fields():
        var = variable(f.name)
        if env.get(var):
            found.append((f.name, convert(f.name, f.type, env[var]), var))
    return tuple(found)


def star_url(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The ``"*"`` database's URL and its variable: ``PGPROXY_UPSTREAM`` or ``DATABASE_URL``."""
    ours, common = env.get(ENV_UPSTREAM), env.get(ENV_DATABASE_URL)
    if ours and common and ours != common:
        raise ConfigError(f"{ENV_DATABASE_URL}: differs from {ENV_UPSTREAM} (set one of them)")
    if ours:
        return ours, ENV_UPSTREAM
    if common:
        return common, ENV_DATABASE_URL
    return None


def database_urls(env: Mapping[str, str]) -> tuple[tuple[str, str, str], ...]:
    """(database, url, label) for each ``NAME=URL`` entry of ``DATABASE_URLS``.

    Messages name the entry by position and database, never by URL (it may hold a password)."""
    text = env.get(ENV_DATABASE_URLS, "").strip()
    if not text:
        return ()
    star = star_url(env)
    entries: list[tuple[str, str, str]] = []
    for number, entry in enumerate(_URLS_SPLIT.split(text), 1):
        name, sep, url = entry.strip().strip(",").partition("=")
        name, url = name.strip(), url.strip()
        # No NAME= at all (a URL whose query has a '='): nothing of the entry is shown.
        if not sep or not name or not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"{ENV_DATABASE_URLS}: entry {number} must be NAME=URL "
                "(entries separated by commas, e.g. app=postgresql://db1/app,*=postgresql://db2)"
            )
        label = f"{ENV_DATABASE_URLS} ({name})"
        if any(name == seen for seen, _, _ in entries):
            raise ConfigError(f"{label}: database given twice")
        if name == WILDCARD and star is not None:
            raise ConfigError(f"{label}: the database is also given by {star[1]} (set one)")
        entries.append((name, url, label))
    return tuple(entries)


# --------------------------------------------------------------------------- the table

_HEADER = "| Variable | Setting | Type | Default |\n|---|---|---|---|\n"
# The variables that are not one setting each, before the settings' rows.
_OTHER_ROWS = (
    (f"`{ENV_CONFIG}`", "the TOML file", "path", "none"),
    (
        f"`{ENV_DATABASE_URL}` or `{ENV_UPSTREAM}`",
        '`databases."*".url`',
        "`postgresql://` URL",
        f"`{DEFAULT_UPSTREAM_URL}` while no database is configured",
    ),
    (
        f"`{ENV_DATABASE_URLS}`",
        "`databases.NAME.url`",
        "`NAME=URL` entries, comma-separated",
        "none",
    ),
    (f"`{ENV_LISTEN}`", "`proxy.listen` (wins over the next two)", "`HOST:PORT`", "none"),
)
_PARTS = {"listen_host": "`proxy.listen` (host)", "listen_port": "`proxy.listen` (port)"}


def _type_text(name: str, typ: Any) -> str:
    if name in _AUTO:
        return "integer or `auto`"
    if name in _OCTAL:
        return "octal integer"
    if get_origin(typ) is Literal:
        return ", ".join(f"`{choice}`" for choice in get_args(typ))
    if _is_list(typ):
        return "comma-separated list"
    names = {bool: "boolean", int: "integer", float: "seconds", str: "string"}
    if typ in names:
        return names[typ]
    raise TypeError(f"ProxySettings.{name}: no environment conversion for {typ!r}")


def _default_text(name: str, default: object) -> str:
    if name in _OCTAL and isinstance(default, int):
        text = f"0{default:o}"
    elif isinstance(default, bool):
        text = str(default).lower()
    elif isinstance(default, float):
        text = f"{default:g}"
    elif isinstance(default, list | tuple):
        text = ",".join(str(item) for item in default)
    else:
        text = str(default)
    return f"`{text}`" if text else '`""`'


def _default(f: dataclasses.Field[Any]) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def env_table() -> str:
    """The Markdown table of every variable: name, setting, type and default."""
    rows = list(_OTHER_ROWS)
    for f in _fields():
        setting = _PARTS.get(f.name, f"`proxy.{f.name}`")
        rows.append(
            (
                f"`{variable(f.name)}`",
                setting,
                _type_text(f.name, f.type),
                _default_text(f.name, _default(f)),
            )
        )
    lines = ("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |\n" for row in rows)
    return _HEADER + "".join(lines)
