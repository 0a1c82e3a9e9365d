"""Statement classification: a cheap byte pre-check, and pglast only when it says "maybe".

The common query never reaches pglast: ``might_matter`` is one case-insensitive regex scan in C
over the raw Query bytes. Only text that contains one of the few words the proxy cares about is
parsed, with Postgres' own grammar (pglast wraps libpg_query), so channel names follow the
server's identifier rules exactly: unquoted names fold to lower case, quoted ones keep their
case, and names are truncated to 63 bytes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.enums.parsenodes import DiscardMode, TransactionStmtKind, VariableSetKind
from pglast.stream import RawStream

_NOTIFY = re.compile(r"notify", re.IGNORECASE)


def might_matter(query_body: bytes | str) -> bool:
    """True if query text may LISTEN, UNLISTEN, NOTIFY, DISCARD, DEALLOCATE or use savepoints
    (false positives are fine)."""
    if isinstance(query_body, str):
        query_body = query_body.encode("utf-8", "surrogateescape")
    # bytes.lower() folds ASCII only, which is all these keywords need; measured an order of
    # magnitude cheaper than a case-insensitive regex (bench/precheck.py).
    low = query_body.lower()
    return (
        b"listen" in low
        or b"notify" in low
        or b"discard" in low
        or b"deallocate" in low
        or b"savepoint" in low  # LISTEN effects follow savepoints (PROTOCOL-NOTES 10)
        or b"rollback" in low
        or b"release" in low
    )


_LISTENING_CHANNELS = re.compile(
    r"\s*select\s+(?:\*\s+from\s+)?(?:pg_catalog\s*\.\s*)?pg_listening_channels\s*\(\s*\)"
    r"\s*;?\s*",
    re.IGNORECASE,
)


def is_listening_channels_query(sql: str) -> bool:
    """The plain ``SELECT pg_listening_channels()`` forms the proxy answers itself."""
    return _LISTENING_CHANNELS.fullmatch(sql) is not None


def may_notify(sql: str) -> bool:
    """True if running ``sql`` may send a notification (NOTIFY or pg_notify)."""
    return _NOTIFY.search(sql) is not None


@dataclass(frozen=True)
class Listen:
    channel: str


@dataclass(frozen=True)
class Unlisten:
    channel: str | None  # None = UNLISTEN *


Subscription = Listen | Unlisten


@dataclass(frozen=True)
class Savepoint:
    name: str


@dataclass(frozen=True)
class Release:
    name: str


@dataclass(frozen=True)
class RollbackTo:
    name: str


SavepointOp = Savepoint | Release | RollbackTo


@dataclass(frozen=True)
class SetParameter:
    """A session-level SET (``statement``: how Postgres' parser prints it) or, with
    ``statement`` None, a RESET / SET ... TO DEFAULT."""

    name: str
    statement: str | None


@dataclass(frozen=True)
class ResetAll:
    pass


SettingEffect = SetParameter | ResetAll
Effect = Subscription | SavepointOp | SettingEffect

_SET_START = re.compile(rb"\s*(?:set|reset)\s", re.IGNORECASE)


def starts_with_set(query_body: bytes) -> bool:
    """True if a Query starts with SET or RESET (checked at the first bytes only)."""
    return _SET_START.match(query_body) is not None


# DISCARD ALL acts as UNLISTEN * on channels, but only the server can run the rest of it;
# this instance (compared by identity) marks it.
_DISCARD_ALL = Unlisten(None)


_SAVEPOINT_OPS: dict[int, type[Savepoint] | type[Release] | type[RollbackTo]] = {
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: Savepoint,
    TransactionStmtKind.TRANS_STMT_RELEASE: Release,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: RollbackTo,
}


@functools.lru_cache(maxsize=1024)
def _classify(sql: str) -> tuple[Effect | None, ...] | None:
    """Each statement's effect on the session's channels or savepoints (None for any other
    statement); None if the text does not parse. Cached: drivers send the same few texts
    (ROLLBACK, SAVEPOINT "_pg3_1", LISTEN "jobs") over and over, and effects are immutable."""
    try:
        parsed = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    out: list[Effect | None] = []
    for raw in parsed:
        stmt = raw.stmt
        if isinstance(stmt, ast.ListenStmt):
            out.append(Listen(str(stmt.conditionname)))
        elif isinstance(stmt, ast.UnlistenStmt):
            out.append(Unlisten(None if stmt.conditionname is None else str(stmt.conditionname)))
        elif isinstance(stmt, ast.DiscardStmt) and stmt.target == DiscardMode.DISCARD_ALL:
            out.append(_DISCARD_ALL)
        elif isinstance(stmt, ast.TransactionStmt) and stmt.kind in _SAVEPOINT_OPS:
            out.append(_SAVEPOINT_OPS[stmt.kind](str(stmt.savepoint_name)))
        elif isinstance(stmt, ast.VariableSetStmt) and not stmt.is_local:
            out.append(_setting(stmt))
        else:
            out.append(None)
        if isinstance(stmt, ast.DiscardStmt) and stmt.target == DiscardMode.DISCARD_ALL:
            out.append(ResetAll())  # DISCARD ALL includes RESET ALL
    return tuple(out)


def _setting(stmt: ast.VariableSetStmt) -> SettingEffect | None:
    kind = stmt.kind
    if kind == VariableSetKind.VAR_SET_VALUE:
        return SetParameter(str(stmt.name), RawStream()(stmt))
    if kind in (VariableSetKind.VAR_SET_DEFAULT, VariableSetKind.VAR_RESET):
        return SetParameter(str(stmt.name), None)
    if kind == VariableSetKind.VAR_RESET_ALL:
        return ResetAll()
    return None  # SET TRANSACTION ..., SET ... FROM CURRENT: nothing that outlives the session


def subscription_statements(sql: str) -> list[Subscription] | None:
    """The statements of ``sql`` if every one is LISTEN or UNLISTEN, else None.

    None also for text that does not parse or holds no statement at all (the server must
    answer those itself: its exact error, or EmptyQueryResponse), and for DISCARD ALL, which
    the server must run (it resets much more than channels).
    """
    parsed = _classify(sql)
    out: list[Subscription] = []
    for s in parsed or ():
        if not isinstance(s, Listen | Unlisten) or s is _DISCARD_ALL:
            return None
        out.append(s)
    return out or None


def session_effects(sql: str) -> list[Effect] | None:
    """The LISTEN/UNLISTEN and savepoint statements among all statements of ``sql``, in order.

    ``DISCARD ALL`` counts as ``UNLISTEN *``. None if the text does not parse (the server will
    refuse it too, so it has no effect).
    """
    parsed = _classify(sql)
    return None if parsed is None else [s for s in parsed if s is not None]


def apply_effects(channels: set[str], effects: list[Subscription | SettingEffect]) -> set[str]:
    """The channel set after ``effects`` run in order on ``channels``."""
    out = set(channels)
    for effect in effects:
        if not isinstance(effect, Listen | Unlisten):
            continue
        if isinstance(effect, Listen):
            out.add(effect.channel)
        elif effect.channel is None:
            out.clear()
        else:
            out.discard(effect.channel)
    return out
