"""``pg_listening_channels()`` rewritten to answer the client's own channels.

In transaction mode a client's LISTENs live in the proxy's listener, so the pooled server that
runs its statement listens to nothing of its own. Wherever Postgres' grammar (pglast) sees a
call of the function in a statement that runs a query now, the call becomes
``pg_catalog.unnest(<the client's channels as text[]>)``: the same type (``setof text``), the
same rows in the same order, with an alias where the column or range would otherwise be named
``unnest`` (a target-list column, a FROM item without an alias), so names stay Postgres' own.
Only the statement holding a call is replaced (by pglast's deparse of it); the rest of the
text is kept as sent.

The channels are written into the text as a literal (:func:`channels_literal`), so every
reply is Postgres' own and the server holds nothing of the client's. A simple Query is
rewritten each time it is sent; a prepared statement's Parse is sent with the channels of that
moment, and the proxy maps the client's statement name to a new server statement whenever the
client's channels change (``client/statements.py``), so every Bind runs with the channels
committed by then: a LISTEN of a still-open transaction is not listed, as in Postgres.

Rule: a rewritten statement returns exactly what Postgres returns to the client; where that
cannot be promised (a statement that stores the query for later, such as CREATE VIEW or
PREPARE), nothing is rewritten.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

import pglast
from pglast import ast
from pglast.enums.parsenodes import ObjectType
from pglast.stream import RawStream
from pglast.visitors import Ancestor, Visitor

from pgproxy.params import quote_literal

NAME: Final = "pg_listening_channels"
# Stands where the channel array goes in the deparsed text (texts containing it are left alone).
_MARKER: Final = "pgproxy_listening_channels_marker"


@dataclass(frozen=True)
class Rewritten:
    """A text whose calls of pg_listening_channels() read a channel array: ``pieces`` are the
    text around the places the array goes."""

    pieces: tuple[str, ...]

    def text(self, channels_sql: str) -> str:
        """The statement text with ``channels_sql`` (an expression of type text[]) in place."""
        return channels_sql.join(self.pieces)


def array_literal(channels: list[str]) -> str:
    """``channels`` as a text[] input string (every element quoted: names may hold commas,
    quotes, backslashes, braces, spaces or the word NULL)."""
    quoted = ('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in channels)
    return "{" + ",".join(quoted) + "}"


def channels_literal(channels: list[str]) -> str:
    """An SQL expression of type text[] holding ``channels``."""
    return quote_literal(array_literal(channels)) + "::pg_catalog.text[]"


@functools.lru_cache(maxsize=256)
def rewrite(sql: str) -> Rewritten | None:
    """``sql`` with its calls of pg_listening_channels() reading a channel array, or None if
    it has none the proxy can rewrite (or does not parse). Cached: drivers send the same few
    texts again and again."""
    low = sql.lower()
    if NAME not in low or _MARKER in low:
        return None
    try:
        parsed = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    out: list[str] = []
    done = 0  # how much of ``sql`` is in ``out``
    for raw in parsed:
        stmt = raw.stmt
        if stmt is None or not _runs_its_query_now(stmt):
            continue
        calls = _Calls()
        calls(stmt)
        if not calls.found:
            continue
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)  # 0: to the end
        out += (sql[done:start], RawStream()(stmt))
        done = end
    if not out:
        return None
    out.append(sql[done:])
    return Rewritten(tuple("".join(out).split(_MARKER)))


def _runs_its_query_now(stmt: ast.Node) -> bool:
    """A statement whose query runs now, for this client (not stored for later runs)."""
    if isinstance(stmt, ast.ExplainStmt):
        return stmt.query is not None and _runs_its_query_now(stmt.query)
    if isinstance(stmt, ast.CreateTableAsStmt):  # not CREATE MATERIALIZED VIEW: it refreshes
        return stmt.objtype == ObjectType.OBJECT_TABLE
    return isinstance(
        stmt,
        ast.SelectStmt
        | ast.InsertStmt
        | ast.UpdateStmt
        | ast.DeleteStmt
        | ast.MergeStmt
        | ast.CopyStmt
        | ast.DeclareCursorStmt,
    )


def _is_call(node: object) -> bool:
    """A plain call of pg_catalog.pg_listening_channels() (anything else, such as an OVER or
    an argument, is left for the server to refuse)."""
    if not isinstance(node, ast.FuncCall) or node.args:
        return False
    names = [str(part.sval) for part in node.funcname or ()]
    return (
        (names == [NAME] or names == ["pg_catalog", NAME])
        and node.agg_order is None
        and node.agg_filter is None
        and node.over is None
        and not node.agg_star
        and not node.agg_distinct
        and not node.func_variadic
        and not node.agg_within_group
    )


def _names_its_column(node: object) -> bool:
    """Postgres names a target-list column after this expression's call (FigureColname: a
    function call, through casts and COLLATE)."""
    while isinstance(node, ast.TypeCast | ast.CollateClause):
        node = node.arg
    return _is_call(node)


def _replacement() -> ast.FuncCall:
    stmt = pglast.parse_sql(f"SELECT pg_catalog.unnest({_MARKER})")[0].stmt
    assert isinstance(stmt, ast.SelectStmt) and stmt.targetList
    call = stmt.targetList[0].val
    assert isinstance(call, ast.FuncCall)
    return call


_REPLACEMENT: Final = _replacement()


class _Calls(Visitor):
    """Replaces the calls (breadth first, so a column or range is named before its call is
    replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def visit_FuncCall(self, ancestors: Ancestor, node: ast.FuncCall) -> ast.Node | None:
        if not _is_call(node):
            return None
        self.found = True
        return _REPLACEMENT

    def visit_ResTarget(self, ancestors: Ancestor, node: ast.ResTarget) -> None:
        if node.name is not None or not _names_its_column(node.val):
            return
        parent = ancestors.parent
        if parent is not None and (
            parent.member in ("targetList", "returningList")
            or isinstance(parent.node, ast.ReturningClause)
        ):
            node.name = NAME

    def visit_RangeFunction(self, ancestors: Ancestor, node: ast.RangeFunction) -> None:
        # A lone function in FROM names its range and (returning a scalar) its column; with
        # ROWS FROM (several functions) the column keeps the name unnest.
        functions = node.functions or ()
        if node.alias is None and len(functions) == 1 and _is_call(functions[0][0]):
            node.alias = ast.Alias(aliasname=NAME)
