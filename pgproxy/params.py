"""Session parameters: what each client should see, and the SQL that makes a server agree.

A client's view is two dictionaries: the *reported* parameters (those Postgres announces with
ParameterStatus: client_encoding, DateStyle, TimeZone, application_name...) with the values the
client last saw, and the *unreported* ones it asked for at startup or with a session ``SET``
(search_path before PG 18, statement_timeout via ``options``...), which only the proxy
remembers, as the statement that sets them. Before a client's
messages reach a server, the differences are applied as one internal Query (PROTOCOL-NOTES 5,
18): the common case, a server already in the right state, costs a dictionary comparison.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError

# Startup parameters that are not GUCs.
NON_GUC_STARTUP_PARAMETERS = frozenset(("user", "database", "options", "replication"))
# Reported parameters a client cannot SET; never synchronised between sessions.
READ_ONLY_PARAMETERS = frozenset(
    (
        "in_hot_standby",
        "integer_datetimes",
        "is_superuser",
        "server_encoding",
        "server_version",
        "session_authorization",
    )
)


class ParamState:
    """An interned snapshot of one set of client parameters (see :func:`param_state`)."""

    __slots__ = ("__weakref__",)


_STATES: weakref.WeakValueDictionary[object, ParamState] = weakref.WeakValueDictionary()


def param_state(reported: Mapping[str, str], unreported: Mapping[str, str]) -> ParamState:
    """The one snapshot object for these parameters: clients with equal parameters share it,
    so "is this server already in the state this client wants" is an identity test."""
    key = (frozenset(reported.items()), frozenset(unreported.items()))
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = ParamState()
    return state


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A string literal that means the same whatever standard_conforming_strings says."""
    escaped = value.replace("'", "''")
    if "\\" in value:
        return "E'" + escaped.replace("\\", "\\\\") + "'"
    return "'" + escaped + "'"


def set_statement(name: str, value: str) -> str:
    """SQL giving ``name`` the raw ``value`` for the session, read as a startup packet or
    postgresql.conf reads it (``SET search_path TO 'a,b'`` would make one schema "a,b")."""
    return f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"


def sync_sql(
    reported: Mapping[str, str],
    unreported: Mapping[str, str],
    server_reported: Mapping[str, str],
    server_unreported: Mapping[str, str],
) -> str | None:
    """SQL that brings a server's parameters to the client's, or None if they agree.

    ``reported`` maps names to values; ``unreported`` maps names to the SET statement that
    gives the client's value (from its startup packet, or its own SET as Postgres' parser
    reads it), so values never need re-formatting.
    """
    stmts = [set_statement(k, v) for k, v in reported.items() if server_reported.get(k) != v]
    stmts += [stmt for k, stmt in unreported.items() if server_unreported.get(k) != stmt]
    stmts += [f"RESET {quote_ident(k)}" for k in server_unreported if k not in unreported]
    return "; ".join(stmts) if stmts else None


def parse_options(options: str) -> dict[str, str]:
    """The ``-c name=value`` / ``--name=value`` settings of the ``options`` startup parameter.

    Follows Postgres' pg_split_opts: words split on unescaped whitespace, backslash escapes the
    next character; dashes in names become underscores.
    """
    words: list[str] = []
    current: list[str] = []
    escaped = False
    have_word = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
            have_word = True
        elif ch in " \t\n\r\f\v":  # ASCII only, as pg_split_opts
            if have_word:
                words.append("".join(current))
                current = []
                have_word = False
        else:
            current.append(ch)
            have_word = True
    if have_word:
        words.append("".join(current))

    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif (word.startswith("-c") and len(word) > 2) or (word.startswith("--") and len(word) > 2):
            setting = word[2:]
            i += 1
        else:
            raise PgError(
                errors.PROTOCOL_VIOLATION,
                f"invalid command-line argument for server process: {word}",
                severity="FATAL",
                hint="pgproxy accepts only -c name=value and --name=value in options",
            )
        name, sep, value = setting.partition("=")
        if not sep:
            raise PgError(
                errors.PROTOCOL_VIOLATION,
                f"-c {name} requires a value",
                severity="FATAL",
            )
        if not name:  # "-c=" (a PgBouncer CVE class): refused here, as Postgres refuses it
            raise PgError(
                errors.UNDEFINED_OBJECT,
                'unrecognized configuration parameter ""',
                severity="FATAL",
            )
        out[name.replace("-", "_").lower()] = value
    return out
