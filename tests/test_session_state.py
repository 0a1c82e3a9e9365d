"""Transaction mode keeps each client's session state whatever server runs its next unit:
the unnamed statement across Syncs, SQL DEALLOCATE, set_config(), RESET, and a clear answer
for the state it cannot carry (advisory locks, temp tables, WITH HOLD cursors)."""

from __future__ import annotations

import logging

import psycopg
import pytest
from psycopg import errors as pgerrors

from pgproxy.protocol import messages as m
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, error_of, rows_of

SYNC = m.message(m.SYNC)


def _types(reply: list[tuple[str, bytes]]) -> list[str]:
    return [t for t, _ in reply]


def _run_unnamed(c: RawClient) -> list[tuple[str, bytes]]:
    c.send(m.bind("", "") + m.execute() + SYNC)
    return c.read_until_ready()


# --- the unnamed statement -----------------------------------------------------------------------


def test_unnamed_statement_survives_a_sync_when_another_client_used_the_server(
    make_proxy: MakeProxy,
) -> None:
    """libpq's PQprepare(conn, "", ...) then PQexecPrepared: two units, one server in between
    used by someone else who also parsed "" - each gets its own statement back."""
    proxy = make_proxy(proxy={"default_pool_size": 1})
    with RawClient(proxy.port) as a, RawClient(proxy.port) as b:
        a.login()
        b.login()
        a.send(m.parse("", "select 'mine-a'") + SYNC)
        assert _types(a.read_until_ready()) == ["1", "Z"]
        b.send(m.parse("", "select 'mine-b'") + SYNC)
        assert _types(b.read_until_ready()) == ["1", "Z"]
        for _ in range(2):
            reply = _run_unnamed(a)
            assert _types(reply) == ["2", "D", "C", "Z"]
            assert rows_of(reply) == [["mine-a"]]
            reply = _run_unnamed(b)
            assert rows_of(reply) == [["mine-b"]]
        # Describe of the unnamed statement also describes the client's own.
        a.send(m.describe("S", "") + SYNC)
        assert _types(a.read_until_ready()) == ["t", "T", "Z"]


def test_unnamed_statement_of_another_client_never_runs(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1})
    with RawClient(proxy.port) as a, RawClient(proxy.port) as b:
        a.login()
        b.login()
        a.send(m.parse("", "select 'secret of a'") + SYNC)
        a.read_until_ready()
        err = error_of(_run_unnamed(b))  # b never prepared one
        assert err is not None and err["C"] == "26000"
        assert rows_of(_run_unnamed(a)) == [["secret of a"]]


def test_simple_query_destroys_the_unnamed_statement_as_in_postgres(proxy: ProxyThread) -> None:
    with RawClient(proxy.port) as c:
        c.login()
        c.send(m.parse("", "select 1") + SYNC)
        c.read_until_ready()
        assert error_of(c.query("select 2")) is None
        err = error_of(_run_unnamed(c))
        assert err is not None and err["C"] == "26000"


def test_psycopg_low_level_unnamed_prepare_then_exec(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1})
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as a,
        psycopg.connect(proxy.dsn(), autocommit=True) as b,
    ):
        a.pgconn.prepare(b"", b"select $1::int * 10")
        b.pgconn.prepare(b"", b"select $1::text || '!'")
        result = a.pgconn.exec_prepared(b"", [b"4"])
        assert result.get_value(0, 0) == b"40"
        result = b.pgconn.exec_prepared(b"", [b"hi"])
        assert result.get_value(0, 0) == b"hi!"


# --- named statements: 42P05 wording, SQL DEALLOCATE -------------------------------------------


def test_duplicate_parse_error_names_the_clients_statement(proxy: ProxyThread) -> None:
    with RawClient(proxy.port) as c:
        c.login()
        c.send(m.parse("s1", "select 1") + SYNC)
        c.read_until_ready()
        c.send(m.parse("s1", "select 1") + SYNC)
        err = error_of(c.read_until_ready())
        assert err is not None and err["C"] == "42P05"
        assert err["M"] == 'prepared statement "s1" already exists'


def test_sql_deallocate_of_a_protocol_statement(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 1, "max_prepared_statements": 1})
    with RawClient(proxy.port) as c:
        c.login()
        c.send(m.parse("s1", "select 1") + m.parse("s2", "select 2") + SYNC)
        assert _types(c.read_until_ready()) == ["1", "1", "Z"]
        # s1 was evicted from the server by s2 (cache of 1): DEALLOCATE still succeeds.
        reply = c.query("DEALLOCATE s1")
        assert error_of(reply) is None
        assert ("C", b"DEALLOCATE\0") in reply
        reply = c.query("deallocate prepare s2")
        assert error_of(reply) is None
        c.send(m.bind("", "s1") + m.execute() + SYNC)
        err = error_of(c.read_until_ready())
        assert err is not None and err["C"] == "26000" and '"s1"' in err["M"]
        c.send(m.parse("s1", "select 'again'") + m.bind("", "s1") + m.execute() + SYNC)
        assert rows_of(c.read_until_ready()) == [["again"]]
        err = error_of(c.query("DEALLOCATE nope"))
        assert err is not None and err["C"] == "26000" and '"nope"' in err["M"]


def test_psycopg_deallocate_inside_a_transaction(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), prepare_threshold=0) as conn:
        conn.execute("select %s::int", (1,))
        names = [r[0] for r in conn.execute("select name from pg_prepared_statements")]
        assert names  # the proxy-wide copy; the client knows it as _pg3_N
        conn.pgconn.prepare(b"mine", b"select 42")
        conn.execute("DEALLOCATE mine", prepare=False)
        conn.commit()
        with pytest.raises(pgerrors.InvalidSqlStatementName):
            conn.execute("DEALLOCATE mine", prepare=False)


# --- parameters: set_config, SET anywhere in a Query, RESET of reported ones --------------------


def _on_another_server(proxy: ProxyThread, conn: psycopg.Connection, query: str) -> tuple:
    """Run ``query`` on ``conn`` while its previous server is held by someone else."""
    first = conn.execute("select pg_backend_pid()").fetchone()
    with psycopg.connect(proxy.dsn()) as other:
        assert other.execute("select pg_backend_pid()").fetchone() == first
        row = conn.execute(f"select pg_backend_pid(), {query}").fetchone()
        other.rollback()
    assert row is not None and first is not None and row[0] != first[0]
    return tuple(row[1:])


def test_set_config_and_a_set_later_in_a_query_follow_the_client(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select set_config('search_path', 'a, b', false)")
        conn.execute("select set_config('work_mem', '9MB', true)")  # local: gone at commit
        conn.execute("select 1; SET lock_timeout = '4s'")
        conn.execute("SELECT pg_catalog.set_config('statement_timeout', '8s', false)", prepare=True)
        got = _on_another_server(
            proxy,
            conn,
            "current_setting('search_path'), current_setting('work_mem'),"
            " current_setting('lock_timeout'), current_setting('statement_timeout')",
        )
        assert got == ("a, b", "4MB", "4s", "8s")


def test_startup_list_options_mean_what_they_mean_directly(make_proxy: MakeProxy) -> None:
    """``-c search_path=a,b`` is two schemas, as Postgres reads it (not one named "a,b")."""
    proxy = make_proxy(proxy={"default_pool_size": 2})
    with psycopg.connect(proxy.dsn(options="-c search_path=a,b"), autocommit=True) as conn:
        assert _on_another_server(proxy, conn, "current_setting('search_path')") == ("a,b",)
        assert conn.execute("select current_schemas(false)").fetchone() == ([],)
        conn.execute("create schema if not exists b")
        try:
            assert conn.execute("select current_schemas(false)").fetchone() == (["b"],)
        finally:
            conn.execute("drop schema b")


def test_reset_of_a_reported_parameter_returns_to_the_startup_value(
    make_proxy: MakeProxy,
) -> None:
    proxy = make_proxy(proxy={"default_pool_size": 2})
    dsn = proxy.dsn(application_name="from-startup", options="-c TimeZone=Asia/Tokyo")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET application_name = 'changed'")
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("RESET application_name")
        assert conn.info.parameter_status("application_name") == "from-startup"
        assert conn.info.parameter_status("TimeZone") == "UTC"
        conn.execute("RESET ALL")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        got = _on_another_server(
            proxy, conn, "current_setting('application_name'), current_setting('TimeZone')"
        )
        assert got == ("from-startup", "Asia/Tokyo")
        assert conn.execute("show application_name").fetchone() == ("from-startup",)


# --- session state transaction pooling cannot carry --------------------------------------------


def test_untracked_session_state_is_logged_once(
    proxy: ProxyThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(4711)")
        conn.execute("select pg_advisory_unlock(4711)")
        conn.execute("select pg_try_advisory_lock(%s)", (4711,))
        conn.execute("select pg_advisory_unlock(4711)")
        conn.execute("select pg_advisory_xact_lock(4711)")  # transaction-scoped: fine
    warned = [r.getMessage() for r in caplog.records if "advisory lock" in r.getMessage()]
    assert len(warned) == 2, warned  # pg_advisory_lock and pg_try_advisory_lock, once each


def test_untracked_session_state_can_be_refused(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy={"unsupported_session_state": "error"})
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("select 1")
        with pytest.raises(pgerrors.FeatureNotSupported) as exc:
            conn.execute("select pg_advisory_lock(%s)", (7,))  # extended protocol
        assert "advisory lock" in str(exc.value)
        assert "transaction pooling" in str(exc.value)
        # As with any failed statement the transaction is aborted...
        with pytest.raises(pgerrors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        conn.autocommit = True
        for refused in (
            "create temp table t_refused (a int)",
            "declare c cursor with hold for select 1",
            "prepare p as select 1",
        ):
            with pytest.raises(pgerrors.FeatureNotSupported):
                conn.execute(refused)  # simple protocol
        # ... and the session carries on; transaction-scoped forms are allowed.
        with conn.transaction():
            conn.execute("create temp table t_ok (a int) on commit drop")
            conn.execute("select pg_advisory_xact_lock(7)")
        assert conn.execute("select 'still fine'").fetchone() == ("still fine",)


# --- regressions found in review -----------------------------------------------------------------


def test_an_error_earlier_in_the_unit_never_exposes_another_clients_unnamed_statement(
    make_proxy: MakeProxy,
) -> None:
    """The Close "" the proxy puts before a Bind "" is skipped by the server after an earlier
    error in the unit; the proxy must not then believe the server holds nothing."""
    proxy = make_proxy(proxy={"default_pool_size": 1})
    with RawClient(proxy.port) as a, RawClient(proxy.port) as b:
        a.login()
        b.login()
        b.send(m.parse("", "select 'B-secret'") + SYNC)
        b.read_until_ready()
        a.send(m.bind("", "nosuch") + m.bind("", "") + m.execute() + SYNC)
        err = error_of(a.read_until_ready())
        assert err is not None and err["C"] == "26000"
        reply = _run_unnamed(a)
        assert rows_of(reply) == []
        err = error_of(reply)
        assert err is not None and err["C"] == "26000"
        # The same after a Parse "" the server skipped: never B's statement.
        b.send(m.parse("", "select 'B-again'") + SYNC)
        b.read_until_ready()
        a.send(m.bind("", "nosuch") + m.parse("", "select 'A-own'") + SYNC)
        a.read_until_ready()
        assert rows_of(_run_unnamed(a)) != [["B-again"]]


def test_deallocate_when_the_statement_no_longer_parses(make_proxy: MakeProxy) -> None:
    """The server lacks the statement and its text would now fail to parse (its table was
    dropped): DEALLOCATE still answers, as it does directly."""
    proxy = make_proxy(proxy={"default_pool_size": 2})
    with RawClient(proxy.port) as a, RawClient(proxy.port) as b:
        a.login()
        b.login()
        a.query("create table if not exists dealloc_t (x int)")
        a.send(m.parse("s1", "select * from dealloc_t") + SYNC)
        a.read_until_ready()
        assert error_of(b.query("begin")) is None  # b now holds the server that has s1
        try:
            assert error_of(a.query("drop table dealloc_t")) is None  # the other server
            reply = a.query("DEALLOCATE s1")
            assert error_of(reply) is None and ("C", b"DEALLOCATE\0") in reply
        finally:
            b.query("rollback")


def test_reset_then_set_in_one_query_keeps_the_set(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(options="-c TimeZone=Europe/Paris"), autocommit=True) as c:
        c.execute("RESET ALL; SET TimeZone = 'UTC'", prepare=False)
        assert c.info.parameter_status("TimeZone") == "UTC"
        assert c.execute("show TimeZone").fetchone() == ("UTC",)


def test_reset_and_commit_in_one_query(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(application_name="myapp"), autocommit=True) as c:
        c.execute("SET application_name = 'x'")
        c.execute("BEGIN; RESET application_name; COMMIT", prepare=False)
        assert c.info.parameter_status("application_name") == "myapp"
        assert c.execute("show application_name").fetchone() == ("myapp",)


def test_a_refused_statement_in_a_multi_statement_query_is_only_logged(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Replacing the whole Query would also drop the statements before the refused one."""
    proxy = make_proxy(proxy={"unsupported_session_state": "error"})
    with caplog.at_level(logging.WARNING), RawClient(proxy.port) as c:
        c.login()
        reply = c.query("BEGIN; SELECT pg_advisory_xact_lock(1), pg_advisory_lock(2)")
        assert error_of(reply) is None and reply[-1] == ("Z", b"T")
        c.query("SELECT pg_advisory_unlock(2); ROLLBACK")
    assert any("advisory lock" in r.getMessage() for r in caplog.records)


def test_provoked_error_rewrites_stay_per_unit() -> None:
    """A rewrite applies only to its own unit's error and is gone once the unit is over."""
    from pgproxy.prepared import ReplyFilter

    replies = ReplyFilter()
    for unit in range(1000):
        replies.expect_error("needle", lambda f: {**f, "M": "ours"}, unit)
    assert replies.reword({"M": "needle here"}, 5) == {"M": "ours"}
    replies.unit_done(998)
    assert replies.reword({"M": "needle here"}, 5) is None  # unit 5 is over
    assert replies.reword({"M": "needle here"}, 999) == {"M": "ours"}
    replies.error(999)
    assert not replies
