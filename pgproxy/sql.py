"""Statement classification with pglast, for text the pre-check said "maybe" about.

The common query never gets here: the pre-check (``pgproxy.precheck.might_matter``) is a few
substring scans in C over the raw Query bytes. Only text that contains one of the few words the
proxy cares about is parsed, with Postgres' own grammar (pglast wraps libpg_query), so channel
names follow the server's identifier rules exactly: unquoted names fold to lower case, quoted
ones keep their case, and names are truncated to 63 bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import pglast
from pglast import ast
from pglast.enums.parsenodes import DiscardMode, TransactionStmtKind, VariableSetKind
from pglast.enums.primnodes import OnCommitAction
from pglast.stream import RawStream
from pglast.visitors import Visitor

from pgproxy.params import set_statement

_NOTIFY = re.compile(r"notify", re.IGNORECASE)


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


@dataclass(frozen=True)
class Deallocate:
    """SQL ``DEALLOCATE name`` (not ALL)."""

    name: str


@dataclass(frozen=True)
class BoundSetParameter:
    """``set_config('name', $n, false)``: a session SET whose value is the Bind's parameter
    ``n`` (1-based), known only when the prepared statement is bound."""

    name: str
    param: int


@dataclass(frozen=True)
class SessionState:
    """Session state a transaction-mode pool cannot carry from server to server."""

    what: str


SettingEffect = SetParameter | ResetAll
Effect = Subscription | SavepointOp | SettingEffect | Deallocate | SessionState | BoundSetParameter

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
    """The effects of ``sql``'s statements on the session the proxy tracks, in order (None for a
    statement with none); None if the text does not parse. Cached: drivers send the same few
    texts (ROLLBACK, SAVEPOINT "_pg3_1", LISTEN "jobs") over and over, and effects are
    immutable."""
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
            out.append(ResetAll())  # DISCARD ALL includes RESET ALL
        elif isinstance(stmt, ast.TransactionStmt) and stmt.kind in _SAVEPOINT_OPS:
            out.append(_SAVEPOINT_OPS[stmt.kind](str(stmt.savepoint_name)))
        elif isinstance(stmt, ast.VariableSetStmt) and not stmt.is_local:
            out.append(_setting(stmt))
        elif isinstance(stmt, ast.DeallocateStmt):
            out.append(None if stmt.name is None else Deallocate(str(stmt.name)))
        elif isinstance(stmt, ast.PrepareStmt):
            out.append(SessionState("SQL PREPARE (a prepared statement that outlives it)"))
        elif isinstance(stmt, ast.DeclareCursorStmt) and (stmt.options or 0) & _CURSOR_OPT_HOLD:
            out.append(SessionState("a WITH HOLD cursor"))
        else:
            found = _EffectsInside()
            if stmt is not None:
                found(stmt)
            out += found.effects or [None]
    return tuple(out)


_CURSOR_OPT_HOLD = 0x0020  # Postgres' parsenodes.h
_SESSION_ADVISORY_LOCKS = frozenset(
    (
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    )
)


class _EffectsInside(Visitor):
    """Effects buried in an ordinary statement: set_config(), session advisory locks, temporary
    relations (CREATE TEMP TABLE/VIEW/SEQUENCE, SELECT INTO TEMP)."""

    def __init__(self) -> None:
        super().__init__()
        self.effects: list[Effect] = []

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        names = [str(part.sval) for part in node.funcname or ()]
        if len(names) > 2 or (len(names) == 2 and names[0] != "pg_catalog"):
            return
        name = names[-1]
        if name in _SESSION_ADVISORY_LOCKS:
            self.effects.append(SessionState(f"a session-level advisory lock ({name})"))
        elif name == "set_config":
            self.effects += _set_config(node)

    def visit_RangeVar(self, ancestors: object, node: ast.RangeVar) -> None:
        if node.relpersistence == "t" and not _dropped_on_commit(ancestors):
            self.effects.append(SessionState("a temporary relation"))


def _dropped_on_commit(ancestors: object) -> bool:
    """True inside ``CREATE TEMP TABLE ... ON COMMIT DROP``, which lives one transaction."""
    parent = getattr(ancestors, "node", None)
    return isinstance(parent, ast.CreateStmt) and parent.oncommit == OnCommitAction.ONCOMMIT_DROP


def _set_config(call: ast.FuncCall) -> list[Effect]:
    """``set_config(name, value, is_local)``: a session SET when is_local is false."""
    args = call.args or ()
    consts = [a.val for a in args if isinstance(a, ast.A_Const) and not a.isnull]
    if len(args) == 3 and isinstance(args[1], ast.ParamRef) and _not_local(args):
        name = args[0].val if isinstance(args[0], ast.A_Const) else None
        number = args[1].number
        if isinstance(name, ast.String) and number:  # the value comes with the Bind (asyncpg)
            return [BoundSetParameter(str(name.sval).lower(), number)]
    if len(args) != 3 or len(consts) != 3:
        return [SessionState("set_config() with arguments only known when it runs")]
    name, value, is_local = consts
    if not isinstance(name, ast.String) or not isinstance(value, ast.String):
        return [SessionState("set_config() with arguments only known when it runs")]
    local = is_local.boolval if isinstance(is_local, ast.Boolean) else None
    if local is None and isinstance(is_local, ast.String):
        local = {"true": True, "t": True, "on": True, "false": False, "f": False, "off": False}.get(
            str(is_local.sval).lower()
        )
    if local is None:
        return [SessionState("set_config() with arguments only known when it runs")]
    if local:
        return []
    return [SetParameter(str(name.sval).lower(), set_statement(str(name.sval), str(value.sval)))]


def _not_local(args: tuple[object, ...]) -> bool:
    """set_config()'s is_local argument is a literal false."""
    last = args[2]
    if not isinstance(last, ast.A_Const) or last.isnull:
        return False
    value = last.val
    if isinstance(value, ast.Boolean):
        return not value.boolval
    return isinstance(value, ast.String) and str(value.sval).lower() in ("false", "f", "off")


_NAME_BYTES: Final = 63  # NAMEDATALEN - 1


def truncated_identifiers(sql: str) -> list[tuple[str, str]]:
    """(identifier, what it is cut to) for each identifier of ``sql`` longer than Postgres'
    63 bytes, as its scanner reports them (NOTICE 42622): unquoted ones folded to lower case
    (ASCII, as ``downcase_identifier``), quoted ones unquoted; cut on a character boundary."""
    out = []
    for token in pglast.parser.scan(sql):
        if token.name != "IDENT":
            continue
        word = sql[token.start : token.end + 1]  # pglast's offsets count characters
        if word.startswith('"') and word.endswith('"') and len(word) >= 2:
            name = word[1:-1].replace('""', '"')
        else:
            name = "".join(c.lower() if "A" <= c <= "Z" else c for c in word)
        encoded = name.encode("utf-8")
        if len(encoded) > _NAME_BYTES:
            out.append((name, encoded[:_NAME_BYTES].decode("utf-8", "ignore")))
    return out


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


@functools.lru_cache(maxsize=256)
def statement_count(sql: str) -> int:
    """How many statements ``sql`` holds (0 if it does not parse)."""
    try:
        return len(pglast.parse_sql(sql))
    except pglast.parser.ParseError:
        return 0


def is_only(sql: str, effect: Effect) -> bool:
    """True if ``sql`` is exactly one statement, the one with ``effect``."""
    return _classify(sql) == (effect,)


def session_effects(sql: str) -> list[Effect] | None:
    """The LISTEN/UNLISTEN and savepoint statements among all statements of ``sql``, in order.

    ``DISCARD ALL`` counts as ``UNLISTEN *``. None if the text does not parse (the server will
    refuse it too, so it has no effect).
    """
    parsed = _classify(sql)
    return None if parsed is None else [s for s in parsed if s is not None]


def apply_effects(
    channels: Iterable[str], effects: list[Subscription | SettingEffect]
) -> list[str]:
    """The channel list after ``effects`` run in order on ``channels``, in the order Postgres
    lists them: a LISTEN appends a channel not listed yet, an UNLISTEN takes one out."""
    out = dict.fromkeys(channels)
    for effect in effects:
        if not isinstance(effect, Listen | Unlisten):
            continue
        if isinstance(effect, Listen):
            out.setdefault(effect.channel)
        elif effect.channel is None:
            out.clear()
        else:
            out.pop(effect.channel, None)
    return list(out)
