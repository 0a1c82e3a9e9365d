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
