"""The admin console through real drivers: psql, psycopg 3, asyncpg, psycopg2; who gets in.

The console is reached through the normal listen address and the unix socket, logins are
checked like any other (hba, passwords), and only admin_users and stats_users get in.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import pytest

from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy
from tests.support.proxy_runner import ProxyThread
from tests.support.raw import RawClient, error_of, rows_of

ADMIN = {"admin_users": ["postgres"], "stats_users": ["watcher"]}


@pytest.fixture
def admin_proxy(make_proxy: MakeProxy) -> ProxyThread:
    return make_proxy(proxy=ADMIN)


def _psql(pg: PgCluster, conninfo: str, *commands: str) -> str:
    args = [str(pg.bindir / "psql"), "-X", "-A", "-F", "|", "-d", conninfo]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_psql_shows_pools_over_tcp_and_the_unix_socket(
    make_proxy: MakeProxy, pg: PgCluster
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="pgx-"))
    try:
        proxy = make_proxy(proxy={**ADMIN, "unix_socket_dir": str(sock_dir)})
        with psycopg.connect(proxy.dsn(), autocommit=True) as app:
            app.execute("select 1")
            out = _psql(pg, proxy.dsn(dbname="pgbouncer"), "SHOW POOLS")
            header, *rows = out.splitlines()
            assert header.startswith("database|user|cl_active|cl_waiting|")
            assert any(r.startswith("postgres|postgres|1|0|") for r in rows), out
            local = f"host={sock_dir} port={proxy.port} user=postgres dbname=pgproxy"
            out = _psql(pg, local, "show clients")  # the alias, through the socket
            assert "|pgbouncer|none|idle|unix|" in out, out
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_psycopg_uses_the_extended_protocol(admin_proxy: ProxyThread) -> None:
    with psycopg.connect(admin_proxy.dsn(dbname="pgbouncer"), autocommit=True) as con:
        cur = con.execute("SHOW VERSION")
        assert cur.fetchall() == [(f"pgproxy {_version()}",)]
        cur = con.execute("SHOW STATS", prepare=True)  # a named statement
        names = [d.name for d in cur.description or ()]
        assert names[:3] == ["database", "total_server_assignment_count", "total_xact_count"]
        with con.pipeline():
            a, b = con.execute("SHOW LISTS"), con.execute("SHOW STATE")
        assert ("pools", 1) in a.fetchall() and b.fetchall()[0] == ("active", "yes")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="invalid command"):
            con.execute("SHOW NONSENSE")
        assert con.execute("SHOW VERSION").fetchone() is not None  # still usable
    with psycopg.connect(admin_proxy.dsn(dbname="pgbouncer")) as con:  # not autocommit: BEGIN
        assert con.execute("SHOW DATABASES").fetchall()
        con.commit()


async def test_asyncpg_describes_then_executes_in_binary(admin_proxy: ProxyThread) -> None:
    con = await asyncpg.connect(admin_proxy.dsn(dbname="pgbouncer"))
    try:
        async with await psycopg.AsyncConnection.connect(admin_proxy.dsn()) as app:
            await app.execute("select repeat('x', 20000)")  # bytes_sent: a numeric > 10000
        # Binary numeric, int4 and text decode to what the text format says.
        async with await psycopg.AsyncConnection.connect(
            admin_proxy.dsn(dbname="pgbouncer"), autocommit=True
        ) as text:
            cur = await text.execute("SHOW STATS_TOTALS")
            assert [tuple(r) for r in await con.fetch("SHOW STATS_TOTALS")] == await cur.fetchall()
            cur = await text.execute("SHOW LISTS")
            assert [tuple(r) for r in await con.fetch("SHOW LISTS")] == await cur.fetchall()
        pools = await con.fetch("SHOW POOLS")
        assert [r["database"] for r in pools] == ["pgbouncer", "postgres"]
        stats = await con.fetchrow("SHOW TOTALS")
        assert stats is not None and stats["name"] == "total_server_assignment_count"
        clients = await con.fetch("SHOW CLIENTS")
        assert [c["id"] for c in clients] == [con.get_server_pid()]
        statement = await con.prepare("SHOW STATS_TOTALS")
        assert [a.name for a in statement.get_attributes()][:2] == [
            "database",
            "server_assignment_count",
        ]
        console, app_db = await statement.fetch()  # the console's too, as PgBouncer's
        assert console["database"] == "pgbouncer" and console["xact_count"] == 0
        assert app_db["bytes_sent"] > 20000
    finally:
        await con.close()


def test_psycopg2_as_monitoring_agents_connect(admin_proxy: ProxyThread) -> None:
    """psycopg2, simple protocol, startup options as Datadog's agent sends them."""
    dsn = admin_proxy.dsn(dbname="pgbouncer", options="-c extra_float_digits=3")
    conn = psycopg2.connect(dsn, application_name="datadog-agent")
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SHOW POOLS")
        assert [d.name for d in cur.description or ()][:3] == ["database", "user", "cl_active"]
        cur.execute("SHOW CLIENTS")
        columns = [d.name for d in cur.description or ()]
        [me] = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
        assert me["application_name"] == "datadog-agent" and me["database"] == "pgbouncer"
        conn.autocommit = False  # psycopg2's own BEGIN
        cur.execute("SHOW STATS_AVERAGES")
        conn.commit()
    finally:
        conn.close()


def test_startup_parameters_are_accepted_and_ignored(admin_proxy: ProxyThread) -> None:
    with RawClient(admin_proxy.port) as raw:
        info = raw.login(
            database="pgbouncer",
            extra_float_digits="3",
            client_encoding="LATIN1",
            DateStyle="German",
            TimeZone="Asia/Tokyo",
            options="-c search_path=nowhere",
            application_name="tool",
        )
        params = info["params"]
        assert params["client_encoding"] == "UTF8" and params["DateStyle"].startswith("ISO")
        assert params["server_version"].startswith(_version())
        assert params["is_superuser"] == "off" and params["application_name"] == "tool"
        assert {"server_encoding", "TimeZone", "integer_datetimes"} <= set(params)
        assert rows_of(raw.query("SHOW VERSION")) == [[f"pgproxy {_version()}"]]


def test_only_admin_and_stats_users_get_in(admin_proxy: ProxyThread, pg: PgCluster) -> None:
    pg.psql("create role nobody login")
    try:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as refused:
            asyncio.run(asyncpg.connect(admin_proxy.dsn(user="nobody", dbname="pgbouncer")))
        assert refused.value.sqlstate == "28000"
        assert 'user "nobody" is not allowed to use the pgproxy admin console' in str(refused.value)
        # The "*" database does not take the console's names either: nothing upstream.
        with RawClient(admin_proxy.port) as raw:
            raw.startup(user="nobody", database="pgproxy")
            error = error_of(raw.read_all())
            assert error is not None and error["C"] == "28000" and error["S"] == "FATAL"
    finally:
        pg.psql("drop role nobody")


def test_stats_users_may_only_show(admin_proxy: ProxyThread) -> None:
    with psycopg.connect(
        admin_proxy.dsn(user="watcher", dbname="pgbouncer"), autocommit=True
    ) as con:
        assert con.execute("SHOW SERVERS").fetchall() == []
        for command in ("RELOAD", "PAUSE", "KILL postgres", "SHUTDOWN"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                con.execute(command)
    with psycopg.connect(admin_proxy.dsn(dbname="pgbouncer"), autocommit=True) as con:
        con.execute("PAUSE")  # an admin may
        con.execute("RESUME")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="not supported"):
            con.execute("SUSPEND")


def test_console_logins_are_checked_like_any_other(make_proxy: MakeProxy) -> None:
    """[users] passwords, auth_type and [[hba]] rules (with the console's database name)."""
    proxy = make_proxy(
        proxy={**ADMIN, "auth_type": "scram-sha-256", "admin_users": ["boss"]},
        users={"boss": {"password": "boss-secret"}, "postgres": {"password": "pg"}},
        hba=[
            {"database": "pgbouncer", "user": "all", "address": "all", "method": "scram-sha-256"},
            {"database": "pgproxy", "user": "all", "address": "all", "method": "reject"},
        ],
    )
    with psycopg.connect(proxy.dsn(user="boss", password="boss-secret", dbname="pgbouncer")) as con:
        assert con.execute("SHOW STATE").fetchall()
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(asyncpg.connect(proxy.dsn(user="boss", password="nope", dbname="pgbouncer")))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="hba"):
        asyncio.run(
            asyncpg.connect(proxy.dsn(user="boss", password="boss-secret", dbname="pgproxy"))
        )


def test_show_config_masks_secrets(make_proxy: MakeProxy, pg: PgCluster) -> None:
    secrets = ("url-pass-123", "db-pass-456", "user-pass-789")
    proxy = make_proxy(
        proxy=ADMIN,
        databases={
            "app": {"url": f"postgresql://app:{secrets[0]}@{pg.host}:{pg.port}/postgres"},
            "other": {"url": f"postgresql://{pg.host}:{pg.port}/postgres", "password": secrets[1]},
        },
        users={"postgres": {"password": secrets[2]}, "watcher": {"pool_size": 3}},
    )
    with psycopg.connect(
        proxy.dsn(password=secrets[2], dbname="pgbouncer"), autocommit=True
    ) as con:
        rows = con.execute("SHOW CONFIG").fetchall()
    shown = {key: value for key, value, _, _ in rows}
    assert not [r for r in rows for s in secrets if s in "|".join(r)]
    assert shown["databases.app.url"].startswith("postgresql://app:***@")
    assert shown["databases.other.password"] == shown["users.postgres.password"] == "***"
    assert shown["admin_users"] == "postgres" and shown["stats_period"] == "60"
    assert shown["users.watcher.pool_size"] == "3"
    assert {changeable for _, _, _, changeable in rows} == {"yes", "no"}


def _version() -> str:
    from pgproxy import version

    return version()


def test_reload_applies_the_configuration_the_proxy_was_started_with(
    admin_proxy: ProxyThread,
) -> None:
    from pgproxy.config import parse_config

    fresh = parse_config({"proxy": {**ADMIN, "default_pool_size": 9}})
    admin_proxy.call(lambda p: setattr(p, "loader", lambda: fresh))
    with psycopg.connect(admin_proxy.dsn(dbname="pgbouncer"), autocommit=True) as con:
        con.execute("RELOAD")
        rows = dict((k, v) for k, v, _, _ in con.execute("SHOW CONFIG").fetchall())
    assert rows["default_pool_size"] == "9"
