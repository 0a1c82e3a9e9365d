"""Session parameters: quoting, the SQL that syncs a server, and the ``options`` parameter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy import params
from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError

FAST = settings(max_examples=50, deadline=None)
TEXT = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)))
TRICKY = st.text(st.sampled_from(["'", "\\", '"', "a", "é", " ", "E", "\n", "$"]))


def unquote_literal(literal: str, *, standard_conforming_strings: bool) -> str:
    """What the server reads from a string constant (only the escapes the quoter may use)."""
    if literal.startswith("E'"):
        body, backslash_escapes = literal[2:], True
    else:
        assert literal.startswith("'"), literal
        body, backslash_escapes = literal[1:], not standard_conforming_strings
    out: list[str] = []
    i = 0
    while True:
        assert i < len(body), f"unterminated literal {literal!r}"
        ch = body[i]
        if ch == "'":
            if body[i + 1 : i + 2] == "'":
                out.append("'")
                i += 2
                continue
            assert i == len(body) - 1, f"literal ends early: {literal!r}"
            return "".join(out)
        if ch == "\\" and backslash_escapes:
            nxt = body[i + 1 : i + 2]
            assert nxt in ("\\", "'"), f"unexpected escape in {literal!r}"
            out.append(nxt)
            i += 2
            continue
        out.append(ch)
        i += 1


def unquote_ident(ident: str) -> str:
    assert ident.startswith('"') and ident.endswith('"') and len(ident) >= 2, ident
    inner = ident[1:-1]
    assert '"' not in inner.replace('""', ""), f"unescaped quote in {ident!r}"
    return inner.replace('""', '"')


# --- quoting ------------------------------------------------------------------------------------


@FAST
@given(value=st.one_of(TRICKY, TEXT), scs=st.booleans())
def test_quote_literal_means_the_same_string_whatever_standard_conforming_strings(
    value: str, scs: bool
) -> None:
    literal = params.quote_literal(value)
    assert unquote_literal(literal, standard_conforming_strings=scs) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("UTC", "'UTC'"),
        ("", "''"),
        ("O'Brien", "'O''Brien'"),
        ("C:\\temp", "E'C:\\\\temp'"),
        ("it's a \\ path", "E'it''s a \\\\ path'"),
        ("\\'", "E'\\\\'''"),
    ],
)
def test_quote_literal_known_text(value: str, expected: str) -> None:
    assert params.quote_literal(value) == expected


def test_quote_literal_without_backslash_is_a_plain_literal() -> None:
    assert not params.quote_literal("a'b").startswith("E")


@FAST
@given(name=st.one_of(TRICKY, TEXT))
def test_quote_ident_round_trips(name: str) -> None:
    assert unquote_ident(params.quote_ident(name)) == name


def test_quote_ident_doubles_quotes() -> None:
    assert params.quote_ident('a"b') == '"a""b"'
    assert params.quote_ident("DateStyle") == '"DateStyle"'


# --- sync_sql -----------------------------------------------------------------------------------


def test_sync_sql_is_none_when_views_agree() -> None:
    reported = {"TimeZone": "UTC", "DateStyle": "ISO, MDY"}
    unreported = {"search_path": params.set_statement("search_path", "app")}
    assert params.sync_sql(reported, unreported, dict(reported), dict(unreported)) is None
    assert params.sync_sql({}, {}, {}, {}) is None


def test_sync_sql_ignores_reported_values_the_client_has_no_view_of() -> None:
    assert params.sync_sql({}, {}, {"TimeZone": "UTC", "server_version": "17.0"}, {}) is None


def test_sync_sql_sets_differing_reported_value() -> None:
    sql = params.sync_sql({"TimeZone": "Europe/Paris"}, {}, {"TimeZone": "UTC"}, {})
    assert sql == "SELECT pg_catalog.set_config('TimeZone', 'Europe/Paris', false)"


def test_sync_sql_sets_reported_value_the_server_lacks() -> None:
    sql = params.sync_sql({"application_name": "app"}, {}, {}, {})
    assert sql == "SELECT pg_catalog.set_config('application_name', 'app', false)"


def test_sync_sql_sets_differing_unreported_value() -> None:
    sql = params.sync_sql(
        {},
        {"statement_timeout": params.set_statement("statement_timeout", "5s")},
        {},
        {"statement_timeout": params.set_statement("statement_timeout", "1s")},
    )
    assert sql == "SELECT pg_catalog.set_config('statement_timeout', '5s', false)"


def test_sync_sql_sets_unreported_value_the_server_lacks() -> None:
    stmt = "SET search_path TO 'app', 'public'"  # a client's own SET, as pglast prints it
    assert params.sync_sql({}, {"search_path": stmt}, {}, {}) == stmt


def test_sync_sql_resets_unreported_value_the_client_does_not_want() -> None:
    sql = params.sync_sql({}, {}, {}, {"search_path": "other"})
    assert sql == 'RESET "search_path"'


def test_sync_sql_combines_sets_then_resets() -> None:
    sql = params.sync_sql(
        {"TimeZone": "UTC", "DateStyle": "ISO, DMY"},
        {"search_path": "SET search_path TO 'a'", "work_mem": "SET work_mem TO '64MB'"},
        {"TimeZone": "UTC", "DateStyle": "ISO, MDY"},
        {
            "search_path": "SET search_path TO 'b'",
            "work_mem": "SET work_mem TO '64MB'",
            "lock_timeout": "SET lock_timeout TO '1s'",
        },
    )
    assert sql == (
        "SELECT pg_catalog.set_config('DateStyle', 'ISO, DMY', false); "
        """SET search_path TO 'a'; RESET "lock_timeout\""""
    )


def test_set_statement_quotes_names_and_values() -> None:
    assert params.set_statement('my.od"d', "it's C:\\x") == (
        """SELECT pg_catalog.set_config('my.od"d', E'it''s C:\\\\x', false)"""
    )


SETTINGS = st.dictionaries(st.sampled_from(["a", "b", "c", "TimeZone"]), TRICKY, max_size=4)


@FAST
@given(reported=SETTINGS, unreported=SETTINGS, server_rep=SETTINGS, server_unrep=SETTINGS)
def test_sync_sql_is_none_exactly_when_nothing_differs(
    reported: dict[str, str],
    unreported: dict[str, str],
    server_rep: dict[str, str],
    server_unrep: dict[str, str],
) -> None:
    agree = all(server_rep.get(k) == v for k, v in reported.items()) and unreported == server_unrep
    assert (params.sync_sql(reported, unreported, server_rep, server_unrep) is None) == agree


# --- parse_options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", {}),
        ("   ", {}),
        ("-c a=b", {"a": "b"}),
        ("-ca=b", {"a": "b"}),
        ("--a-b=c", {"a_b": "c"}),
        ("-c statement-timeout=5s", {"statement_timeout": "5s"}),
        ("-c search_path=a\\ b", {"search_path": "a b"}),
        ("-c search_path=a\\\\b", {"search_path": "a\\b"}),
        ("-c x=a=b", {"x": "a=b"}),
        ("-c x=", {"x": ""}),
        ("-c Search_Path=App", {"search_path": "App"}),
        ("--Work-Mem=64MB", {"work_mem": "64MB"}),
        (
            "-c a=1  -cb=2\t--c-d=3\n-c geqo=off",
            {"a": "1", "b": "2", "c_d": "3", "geqo": "off"},
        ),
        ("-c a=1 -c a=2", {"a": "2"}),
    ],
)
def test_parse_options_reads_settings(options: str, expected: dict[str, str]) -> None:
    assert params.parse_options(options) == expected


@pytest.mark.parametrize(
    "options",
    [
        "garbage",
        "-c",
        "-c a=b -c",
        "--",
        "-",
        "-B 100",
        "-c a",
        "-ca",
        "--statement_timeout",
        "-c a=b extra",
    ],
)
def test_parse_options_rejects_garbage_as_fatal_protocol_violation(options: str) -> None:
    with pytest.raises(PgError) as info:
        params.parse_options(options)
    assert info.value.sqlstate == errors.PROTOCOL_VIOLATION == "08P01"
    assert info.value.severity == "FATAL"
    assert info.value.fatal


@FAST
@given(
    settings_=st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10),
        st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",))),
        max_size=4,
    )
)
def test_parse_options_reads_back_escaped_values(settings_: dict[str, str]) -> None:
    def escape(s: str) -> str:
        return "".join("\\" + ch if ch.isspace() or ch == "\\" else ch for ch in s)

    options = " ".join(f"-c {k}={escape(v)}" for k, v in settings_.items())
    assert params.parse_options(options) == settings_


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\x1c", "\x85"])
def test_parse_options_splits_only_on_ascii_whitespace(space: str) -> None:
    value = f"a{space}b"
    assert params.parse_options(f"-c application_name={value}") == {"application_name": value}
