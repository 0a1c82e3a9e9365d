"""Fast checks of the throwaway-cluster fixture itself (no proxy involved)."""

from __future__ import annotations

import os

import asyncpg
import psycopg
import pytest

from pgproxy.testing.cluster import (
    APP_DB,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    PW_PASSWORD,
    PW_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    PgCluster,
)

PASSWORD_USERS = [
    pytest.param(MD5_USER, MD5_PASSWORD, "md5", id="md5"),
    pytest.param(SCRAM_USER, SCRAM_PASSWORD, "SCRAM-SHA-256$", id="scram"),
    pytest.param(PW_USER, PW_PASSWORD, None, id="password"),
]


def test_superuser_connects_over_tcp(pg: PgCluster) -> None:
    assert pg.host == "127.0.0.1"
    assert pg.port not in (0, 5432)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "select current_user, inet_server_port(), current_setting('max_connections')"
        ).fetchone()
    assert row == ("postgres", pg.port, "100")


def test_app_user_and_database(pg: PgCluster) -> None:
    with psycopg.connect(pg.dsn(APP_USER, dbname=APP_DB), autocommit=True) as conn:
        row = conn.execute(
            "select current_user, current_database(), rolsuper"
            " from pg_roles where rolname = current_user"
        ).fetchone()
    assert row == (APP_USER, APP_DB, True)


@pytest.mark.parametrize(("user", "password", "stored_prefix"), PASSWORD_USERS)
def test_password_users(pg: PgCluster, user: str, password: str, stored_prefix: str | None) -> None:
    with psycopg.connect(pg.dsn(user, password=password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    if stored_prefix is not None:
        stored = pg.psql(f"select rolpassword from pg_authid where rolname = '{user}'")
        assert stored.startswith(stored_prefix)
    # libpq does not expose the SQLSTATE of a failed connection attempt, so psycopg
    # raises a plain OperationalError; check the message here and the code via asyncpg.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user, password=password + "x"))


@pytest.mark.parametrize(("user", "password", "stored_prefix"), PASSWORD_USERS)
async def test_wrong_password_sqlstate(
    pg: PgCluster, user: str, password: str, stored_prefix: str | None
) -> None:
    conn = await asyncpg.connect(pg.dsn(user, password=password))
    try:
        assert await conn.fetchval("select current_user") == user
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(pg.dsn(user, password="wrong"))
    assert info.value.sqlstate == "28P01"
    assert info.value.sqlstate == psycopg.errors.InvalidPassword.sqlstate


def test_psql(pg: PgCluster) -> None:
    assert pg.psql("select 1") == "1"
    assert pg.psql("select 1, 'a'; select 2") == "1|a\n2"
    assert pg.psql("select current_database()", dbname=APP_DB) == APP_DB
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg.psql("select * from no_such_table")


def test_restart_keeps_port_and_data(pg: PgCluster) -> None:
    port, data_dir = pg.port, pg.data_dir
    pg.psql("drop table if exists restart_probe; create table restart_probe as select 42 as x")
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            pid_before = conn.execute("select pg_postmaster_start_time()").fetchone()
            pg.restart()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")
        assert (pg.port, pg.data_dir) == (port, data_dir)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            assert conn.execute("select x from restart_probe").fetchone() == (42,)
            assert conn.execute("select pg_postmaster_start_time()").fetchone() != pid_before
    finally:
        pg.start()  # no-op when running
        pg.psql("drop table if exists restart_probe")


def test_the_server_under_test_is_the_one_asked_for(pg: PgCluster) -> None:
    """scripts/test runs part of the suite again against PostgreSQL 18 (PG_BIN and
    PGPROXY_EXPECT_PG=18): that pass must really run it."""
    expected = os.environ.get("PGPROXY_EXPECT_PG")
    major = pg.psql("show server_version").split(".")[0]
    assert major == (expected or major), f"PG_BIN={os.environ.get('PG_BIN')} runs {major}"
    assert int(major) >= 15
