"""Verifier-only users against a real cluster: SCRAM/md5 pass-through upstream, and auth_query.

The roles are created here, with ``scram-sha-256`` (or ``md5``) lines for them put in front of
the shared cluster's pg_hba.conf, so the upstream really asks for the password the proxy does
not have: only the verifier copied from ``pg_authid`` (or looked up by auth_query) and the
ClientKey a client's proof reveals get the proxy in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.auth import scram, scram_client
from pgproxy.pool.pool import Pool, PoolSettings
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy, pg_server_url
from tests.support.raw import RawClient

PT_USER, PT_PASSWORD = "pt_scram", "pt-secret"  # SCRAM, upstream asks for SCRAM
PT_MD5, PT_MD5_PASSWORD = "pt_md5", "pt-md5-secret"  # stored as md5, upstream asks for md5
AQ_USER, AQ_PASSWORD = "aq_user", "aq-secret"  # found by auth_query only
AQ_EXPIRED = "aq_expired"  # VALID UNTIL in the past
AQ_AUTH = "aq_auth"  # auth_user with a SECURITY DEFINER lookup function, not a superuser
ROLES = (PT_USER, PT_MD5, AQ_USER, AQ_EXPIRED, AQ_AUTH)


@pytest.fixture(scope="module")
def roles(pg: PgCluster) -> Iterator[dict[str, str]]:
    """Create the roles and require passwords for them upstream; their pg_authid secrets."""
    hba_path = pg.data_dir / "pg_hba.conf"
    original = hba_path.read_text()
    lines = [f"host all {PT_MD5} 127.0.0.1/32 md5"]
    lines += [f"host all {r} 127.0.0.1/32 scram-sha-256" for r in (PT_USER, AQ_USER, AQ_EXPIRED)]
    pg.psql(
        f"""
        SET password_encryption = 'scram-sha-256';
        CREATE ROLE {PT_USER} LOGIN PASSWORD '{PT_PASSWORD}';
        CREATE ROLE {AQ_USER} LOGIN PASSWORD '{AQ_PASSWORD}';
        CREATE ROLE {AQ_EXPIRED} LOGIN PASSWORD '{AQ_PASSWORD}' VALID UNTIL '2001-01-01';
        CREATE ROLE {AQ_AUTH} LOGIN;
        SET password_encryption = 'md5';
        CREATE ROLE {PT_MD5} LOGIN PASSWORD '{PT_MD5_PASSWORD}';
        CREATE FUNCTION public.pgproxy_lookup(p_user text) RETURNS TABLE (u name, p text)
            LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
            AS $$ SELECT usename, passwd FROM pg_catalog.pg_shadow
                  WHERE usename = p_user
                    AND (valuntil IS NULL OR valuntil > now()) $$;
        REVOKE ALL ON FUNCTION public.pgproxy_lookup(text) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION public.pgproxy_lookup(text) TO {AQ_AUTH};
        """
    )
    hba_path.write_text("\n".join(lines) + "\n" + original)
    pg.psql("SELECT pg_reload_conf()")
    try:
        names = ", ".join(f"'{r}'" for r in ROLES)
        out = pg.psql(f"SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ({names})")
        yield dict(line.split("|", 1) for line in out.splitlines())
    finally:
        hba_path.write_text(original)
        pg.psql("SELECT pg_reload_conf()")
        pg.psql(
            "DROP FUNCTION IF EXISTS public.pgproxy_lookup(text);"
            + "".join(f"DROP ROLE IF EXISTS {r};" for r in ROLES)
        )


def test_the_upstream_really_wants_the_passwords(pg: PgCluster, roles: dict[str, str]) -> None:
    """Baseline: without the password, the cluster refuses these roles."""
    assert roles[PT_USER].startswith("SCRAM-SHA-256$")
    assert roles[PT_MD5].startswith("md5")
    for user in (PT_USER, PT_MD5):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(pg.dsn(user=user), connect_timeout=5)


async def _asyncpg(proxy: Any, user: str, password: str | None, **kw: Any) -> Any:
    kw.setdefault("database", "postgres")
    return await asyncpg.connect(
        host=proxy.host, port=proxy.port, user=user, password=password, timeout=5, **kw
    )


def _store_key(proxy: Any, user: str, database: str = "postgres") -> tuple[str, int, str]:
    """The pass-through store's key for ``user`` on ``database``'s upstream."""
    db = proxy.config.database_for(database)
    return (db.host, db.port, user)


# --- SCRAM pass-through --------------------------------------------------------------------------


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5"])
async def test_scram_pass_through_with_only_the_verifier(
    make_proxy: MakeProxy, roles: dict[str, str], auth_type: str
) -> None:
    """md5 with a SCRAM verifier runs SCRAM too (as Postgres does), so both work."""
    p = make_proxy(proxy={"auth_type": auth_type}, users={PT_USER: {"password": roles[PT_USER]}})
    with pytest.raises(asyncpg.InvalidPasswordError) as wrong:
        await _asyncpg(p, PT_USER, "wrong")
    assert wrong.value.sqlstate == "28P01"
    conn = await _asyncpg(p, PT_USER, PT_PASSWORD)
    try:
        assert await conn.fetchval("select current_user") == PT_USER
    finally:
        await conn.close()
    with psycopg.connect(p.dsn(user=PT_USER, password=PT_PASSWORD), connect_timeout=5) as c:
        assert c.execute("select current_user").fetchone() == (PT_USER,)
        # A second upstream connection (the first is busy in this transaction) also gets in.
        c.execute("begin")
        with psycopg.connect(p.dsn(user=PT_USER, password=PT_PASSWORD), connect_timeout=5) as c2:
            assert c2.execute("select 1").fetchone() == (1,)
        c.execute("commit")
    assert not p.loop_errors, p.loop_errors


async def test_a_different_upstream_verifier_fails_clearly(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    """Same password, other salt: the client's proof is fine, the upstream cannot be answered."""
    other = scram.ScramVerifier.from_password(PT_PASSWORD)
    p = make_proxy(proxy={"auth_type": "scram-sha-256"}, users={PT_USER: {"password": str(other)}})
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as exc:
        await _asyncpg(p, PT_USER, PT_PASSWORD)
    assert "SCRAM pass-through failed" in str(exc.value)
    assert "not the one pgproxy knows" in str(exc.value)


def test_md5_pass_through_with_only_the_hash(make_proxy: MakeProxy, roles: dict[str, str]) -> None:
    p = make_proxy(proxy={"auth_type": "md5"}, users={PT_MD5: {"password": roles[PT_MD5]}})
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.dsn(user=PT_MD5, password="wrong"), connect_timeout=5)
    with psycopg.connect(p.dsn(user=PT_MD5, password=PT_MD5_PASSWORD), connect_timeout=5) as c:
        assert c.execute("select current_user").fetchone() == (PT_MD5,)


def test_pass_through_listener_and_min_pool_size(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    """The listener connection and min_pool_size warm-up log in with the learnt keys too."""
    p = make_proxy(
        proxy={"auth_type": "scram-sha-256", "min_pool_size": 2},
        users={PT_USER: {"password": roles[PT_USER]}},
    )
    dsn = p.dsn(user=PT_USER, password=PT_PASSWORD)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as listener:
        listener.execute("LISTEN pt_channel")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as notifier:
            notifier.execute("NOTIFY pt_channel, 'hi'")
        note = next(listener.notifies(timeout=5, stop_after=1))
        assert note.payload == "hi"
    pool = p.call(lambda proxy: proxy.pools[("postgres", PT_USER)])
    deadline = time.monotonic() + 5  # warm-up runs in the background after the first login
    while p.call(lambda _: pool.total) < 2:
        assert time.monotonic() < deadline, "min_pool_size warm-up did not log in"
        time.sleep(0.01)
    assert not p.loop_errors, p.loop_errors


async def test_warm_up_waits_for_a_login_when_only_a_verifier_is_known(pg: PgCluster) -> None:
    from pgproxy.config import parse_config

    db = parse_config({"databases": {"*": {"url": pg_server_url(pg)}}}).databases["*"]
    settings = PoolSettings(
        size=2, min_size=2, mode="transaction", connect_timeout=5, idle_timeout=0,
        lifetime=0, reset_query="",
    )  # fmt: skip
    pool = Pool("t", db, "postgres", PT_USER, None, settings, pass_through=lambda: None)
    await pool.warm_up()
    assert pool.total == 0  # skipped cleanly: nothing to log in with yet


# --- auth_query ----------------------------------------------------------------------------------


def _aq_proxy(make_proxy: MakeProxy, **proxy: Any) -> Any:
    return make_proxy(proxy={"auth_type": "scram-sha-256", "auth_user": "postgres", **proxy})


async def test_auth_query_user_logs_in_with_pass_through(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    p = _aq_proxy(make_proxy)
    conn = await _asyncpg(p, AQ_USER, AQ_PASSWORD)
    try:
        assert await conn.fetchval("select current_user") == AQ_USER
    finally:
        await conn.close()
    with psycopg.connect(p.dsn(user=AQ_USER, password=AQ_PASSWORD), connect_timeout=5) as c:
        assert c.execute("select current_user").fetchone() == (AQ_USER,)
    assert p.call(lambda proxy: proxy.auth_query.queries) == 1  # the second login was cached
    assert not p.loop_errors, p.loop_errors


@pytest.mark.parametrize(
    ("user", "password"),
    [
        pytest.param(AQ_USER, "wrong", id="wrong-password"),
        pytest.param("aq_nobody", AQ_PASSWORD, id="unknown-user"),
        pytest.param(AQ_EXPIRED, AQ_PASSWORD, id="expired-valid-until"),
    ],
)
async def test_auth_query_failures_are_all_the_same_28P01(
    make_proxy: MakeProxy, roles: dict[str, str], user: str, password: str
) -> None:
    p = _aq_proxy(make_proxy)
    with pytest.raises(asyncpg.InvalidPasswordError) as exc:
        await _asyncpg(p, user, password)
    assert exc.value.sqlstate == "28P01"
    assert str(exc.value) == f'password authentication failed for user "{user}"'
    assert not p.loop_errors, p.loop_errors


async def test_a_failed_login_drops_the_cached_lookup(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    p = _aq_proxy(make_proxy)
    await (await _asyncpg(p, AQ_USER, AQ_PASSWORD)).close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _asyncpg(p, AQ_USER, "wrong")  # served from the cache, then forgotten
    await (await _asyncpg(p, AQ_USER, AQ_PASSWORD)).close()
    assert p.call(lambda proxy: proxy.auth_query.queries) == 2


def test_security_definer_function_and_a_hostile_search_path(
    make_proxy: MakeProxy, pg: PgCluster, roles: dict[str, str]
) -> None:
    """A non-superuser auth_user calls a SECURITY DEFINER function. Its role-level search_path
    puts a schema first that shadows the function with one answering a password the attacker
    knows: the proxy's auth connection pins search_path, so the shadow is never called."""
    attacker = scram.ScramVerifier.from_password("attacker")
    pg.psql(
        f"""
        CREATE SCHEMA evil;
        CREATE FUNCTION evil.pgproxy_lookup(p_user text) RETURNS TABLE (u name, p text)
            LANGUAGE sql AS $$ SELECT p_user::name, '{attacker}'::text $$;
        GRANT USAGE ON SCHEMA evil TO {AQ_AUTH};
        ALTER ROLE {AQ_AUTH} SET search_path = evil, public;
        """
    )
    try:
        p = make_proxy(
            proxy={
                "auth_type": "scram-sha-256",
                "auth_user": AQ_AUTH,
                "auth_query": "SELECT * FROM public.pgproxy_lookup($1)",
            }
        )
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn(user=AQ_USER, password="attacker"), connect_timeout=5)
        with psycopg.connect(p.dsn(user=AQ_USER, password=AQ_PASSWORD), connect_timeout=5) as c:
            assert c.execute("select current_user").fetchone() == (AQ_USER,)
        # The same query unqualified finds nothing with search_path = pg_catalog: refused,
        # never the shadow.
        p2 = make_proxy(
            proxy={
                "auth_type": "scram-sha-256",
                "auth_user": AQ_AUTH,
                "auth_query": "SELECT * FROM pgproxy_lookup($1)",
            }
        )
        with pytest.raises(psycopg.OperationalError, match="could not look up"):
            psycopg.connect(p2.dsn(user=AQ_USER, password="attacker"), connect_timeout=5)
    finally:
        pg.psql(f"ALTER ROLE {AQ_AUTH} RESET search_path; DROP SCHEMA evil CASCADE;")


async def test_concurrent_logins_share_one_lookup(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    p = _aq_proxy(make_proxy)
    conns = await asyncio.gather(*(_asyncpg(p, AQ_USER, AQ_PASSWORD) for _ in range(8)))
    for conn in conns:
        await conn.close()
    assert p.call(lambda proxy: proxy.auth_query.queries) == 1


def test_per_database_auth_user(
    make_proxy: MakeProxy, pg: PgCluster, roles: dict[str, str]
) -> None:
    p = make_proxy(
        proxy={"auth_type": "scram-sha-256"},
        databases={"lookup": {"url": f"{pg_server_url(pg)}/postgres", "auth_user": "postgres"}},
    )
    with psycopg.connect(
        p.dsn(user=AQ_USER, password=AQ_PASSWORD, dbname="lookup"), connect_timeout=5
    ) as c:
        assert c.execute("select current_user").fetchone() == (AQ_USER,)
    # The "*" database has no auth_user: the same user is unknown there.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.dsn(user=AQ_USER, password=AQ_PASSWORD), connect_timeout=5)


async def test_every_failure_waits_auth_failure_delay(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    """With auth_failure_delay, wrong password, unknown and expired users all take at least
    the delay (a lower bound only: nothing here can flake on a slow machine)."""
    p = _aq_proxy(make_proxy, auth_failure_delay=0.3)
    for user, password in [
        (AQ_USER, "wrong"),
        ("aq_nobody", AQ_PASSWORD),
        (AQ_EXPIRED, AQ_PASSWORD),
    ]:
        start = time.monotonic()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _asyncpg(p, user, password)
        assert time.monotonic() - start >= 0.3, user


def test_secrets_never_reach_the_log(
    make_proxy: MakeProxy, roles: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    p = make_proxy(
        proxy={"auth_type": "scram-sha-256", "auth_user": "postgres", "log_level": "debug"},
        users={PT_USER: {"password": roles[PT_USER]}},
    )
    for user, password in [(PT_USER, PT_PASSWORD), (AQ_USER, AQ_PASSWORD)]:
        with psycopg.connect(p.dsn(user=user, password=password), connect_timeout=5) as c:
            c.execute("select 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(p.dsn(user=user, password=password + "x"), connect_timeout=5)
    keys = p.call(lambda proxy: proxy.pass_through.get(_store_key(proxy, PT_USER)))
    assert isinstance(keys, scram.ScramPassThrough)
    text = caplog.text + repr(p.config)
    assert "password authentication failed" in text  # the log was captured
    import base64

    for secret in (PT_PASSWORD, AQ_PASSWORD, roles[PT_USER], roles[AQ_USER]):
        assert secret not in text
    for raw in (keys.client_key, keys.verifier.stored_key, keys.verifier.server_key):
        assert base64.b64encode(raw).decode() not in text and raw.hex() not in text


@pytest.mark.parametrize(
    ("proxy", "databases", "message"),
    [
        ({"auth_query": "SELECT usename, passwd FROM pg_shadow"}, {}, "proxy.auth_query: must"),
        ({"auth_query_cache_ttl": -1}, {}, "proxy.auth_query_cache_ttl: must be a finite"),
        ({"auth_failure_delay": "1s"}, {}, "proxy.auth_failure_delay: must be a number"),
        ({"auth_user": 5}, {}, "proxy.auth_user: must be a string"),
        ({}, {"d": {"url": "postgresql://h/d", "auth_user": []}}, "databases.d.auth_user: must"),
    ],
)
def test_auth_settings_are_validated(
    proxy: dict[str, Any], databases: dict[str, Any], message: str
) -> None:
    from pgproxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config({"proxy": proxy, "databases": databases})
    assert str(exc.value).startswith(message), str(exc.value)


def test_pass_through_with_a_channel_bound_client(
    make_proxy: MakeProxy, roles: dict[str, str], tmp_path: Any
) -> None:
    """A SCRAM-SHA-256-PLUS proof reveals the same ClientKey: pass-through works over TLS too."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    p = make_proxy(
        proxy={
            "auth_type": "scram-sha-256",
            "client_tls_mode": "require",
            "client_tls_cert_file": str(tmp_path / "c.crt"),
            "client_tls_key_file": str(tmp_path / "c.key"),
        },
        users={PT_USER: {"password": roles[PT_USER]}},
    )
    dsn = p.dsn(user=PT_USER, password=PT_PASSWORD, sslmode="require", channel_binding="require")
    with psycopg.connect(dsn, connect_timeout=5) as c:
        assert c.execute("select current_user").fetchone() == (PT_USER,)


# --- review fixes --------------------------------------------------------------------------------


def test_a_trust_login_never_unlocks_a_stored_md5_hash(
    make_proxy: MakeProxy, pg: PgCluster, roles: dict[str, str]
) -> None:
    """A trust login proved nothing: the md5 hash in [users] must not log it in upstream."""
    p = make_proxy(users={PT_MD5: {"password": roles[PT_MD5]}})  # auth_type defaults to trust
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(p.dsn(user=PT_MD5), connect_timeout=5)
    assert "password" in str(exc.value)
    assert p.call(lambda proxy: len(proxy.pass_through)) == 0
    # Under [[hba]], a trust rule for one database does not learn either; an md5 login does.
    p2 = make_proxy(
        databases={"trusted": {"url": f"{pg_server_url(pg)}/postgres"}},
        users={PT_MD5: {"password": roles[PT_MD5]}},
        hba=[
            {"database": "trusted", "user": "all", "address": "all", "method": "trust"},
            {"database": "all", "user": "all", "address": "all", "method": "md5"},
        ],
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(p2.dsn(user=PT_MD5, dbname="trusted"), connect_timeout=5)
    assert p2.call(lambda proxy: len(proxy.pass_through)) == 0
    with psycopg.connect(p2.dsn(user=PT_MD5, password=PT_MD5_PASSWORD), connect_timeout=5) as c:
        assert c.execute("select current_user").fetchone() == (PT_MD5,)
    assert p2.call(lambda proxy: len(proxy.pass_through)) == 1


@pytest.mark.parametrize(
    ("proxy", "databases", "hba", "key"),
    [
        ({"auth_user": "postgres"}, {}, [], "proxy.auth_user"),
        ({}, {"d": {"url": "postgresql://h/d", "auth_user": "x"}}, [], "databases.d.auth_user"),
        ({"auth_query": "SELECT u, p FROM public.f($1)"}, {}, [], "proxy.auth_query"),
        (
            {"auth_user": "postgres", "auth_type": "md5"},
            {},
            [{"database": "all", "user": "all", "address": "all", "method": "trust"}],
            "proxy.auth_user",
        ),
    ],
)
def test_auth_user_needs_a_password_method(
    proxy: dict[str, Any], databases: dict[str, Any], hba: list[Any], key: str
) -> None:
    from pgproxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config({"proxy": proxy, "databases": databases, "hba": hba})
    assert str(exc.value).startswith(f"{key}: needs a password method"), str(exc.value)
    # With a password method somewhere, the same settings are fine.
    rules = [*hba, {"database": "all", "user": "all", "address": "all", "method": "md5"}]
    parse_config({"proxy": proxy, "databases": databases, "hba": rules})


async def test_auth_pools_never_follow_the_client_database(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    """A client naming new databases before it has authenticated creates no pools and no
    upstream connections, and learns nothing: an unknown database fails like a wrong
    password (28P01), never 08006."""
    p = _aq_proxy(make_proxy)
    for i in range(12):
        with RawClient(p.port) as c:
            c.startup("aq_nobody", f"no_such_db_{i}")
            auth = c.read_message()
            assert auth is not None and auth[0] == "R"  # the exchange runs as for any user
    for database in ("no_such_db", "postgres"):
        with pytest.raises(asyncpg.InvalidPasswordError):  # 28P01 either way
            await _asyncpg(p, AQ_USER, "wrong", database=database)
    routes = p.call(lambda proxy: list(proxy.auth_query._pools))
    assert [route[2] for route in routes] == ["postgres"]  # "*" has no dbname: the default
    # Right password, unknown database: authenticated first, then told as Postgres tells.
    with pytest.raises(asyncpg.InvalidCatalogNameError):  # 3D000
        await _asyncpg(p, AQ_USER, AQ_PASSWORD, database="no_such_db")


@pytest.mark.parametrize(
    ("url_db", "auth_dbname", "entry", "expected"),
    [
        ("", "", "*", "postgres"),  # never the client's database
        ("/appdb", "", "*", "appdb"),  # the wildcard URL's own dbname
        ("", "", "app", "app"),  # a named entry: its name, as its pools use
        ("/appdb", "lookups", "*", "lookups"),  # auth_dbname wins
    ],
)
def test_auth_query_route_comes_from_configuration(
    url_db: str, auth_dbname: str, entry: str, expected: str
) -> None:
    from pgproxy.auth.query import AuthQuery
    from pgproxy.config import parse_config

    config = parse_config(
        {
            "proxy": {"auth_type": "md5", "auth_user": "au", "auth_dbname": auth_dbname},
            "databases": {entry: {"url": f"postgresql://h:5433{url_db}"}},
        }
    )
    db = config.database_for("whatever-the-client-says" if entry == "*" else entry)
    assert db is not None
    assert AuthQuery(lambda *a: None)._route(config, db) == ("h", 5433, expected, "au")  # type: ignore[arg-type,return-value]


_EMPTY_SECRET_QUERY = (
    "SELECT usename, '  ' FROM pg_catalog.pg_shadow WHERE usename OPERATOR(pg_catalog.=) $1"
)


async def test_an_empty_secret_from_auth_query_is_no_password(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    """An empty (or blank) secret is treated like NULL: the doomed exchange and 28P01, never
    an empty plaintext password that an empty answer would match."""
    for auth_type in ("md5", "scram-sha-256"):
        p = make_proxy(
            proxy={
                "auth_type": auth_type,
                "auth_user": "postgres",
                "auth_query": _EMPTY_SECRET_QUERY,
            }
        )
        with RawClient(p.port) as c:
            c.startup(AQ_USER, "postgres")
            auth = c.read_message()
        assert auth is not None and auth[0] == "R"
        assert m.parse_authentication(auth[1])[0] == m.AUTH_SASL  # as for an unknown user
        for password in ("", "  "):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await _asyncpg(p, AQ_USER, password)


async def test_reload_forgets_lookups_and_learnt_credentials(
    make_proxy: MakeProxy, roles: dict[str, str]
) -> None:
    p = _aq_proxy(make_proxy)
    await (await _asyncpg(p, AQ_USER, AQ_PASSWORD)).close()
    assert p.call(lambda proxy: len(proxy.pass_through)) == 1
    p.call(lambda proxy: proxy.reload(proxy.config))
    assert p.call(lambda proxy: len(proxy.pass_through)) == 0
    await (await _asyncpg(p, AQ_USER, AQ_PASSWORD)).close()  # looked up again, learnt again
    assert p.call(lambda proxy: proxy.auth_query.queries) == 2
    assert p.call(lambda proxy: len(proxy.pass_through)) == 1


async def test_a_lookup_from_before_a_reload_is_not_cached_after_it() -> None:
    """The answer of a lookup that was running when the configuration changed serves the
    logins that waited for it, but is never written into the new cache."""
    from pgproxy.auth.query import AuthQuery
    from pgproxy.config import parse_config

    config = parse_config({"proxy": {"auth_type": "md5", "auth_user": "au"}})
    db = config.database_for("postgres")
    assert db is not None
    started, release = asyncio.Event(), asyncio.Event()
    answers = iter(["old-secret", "new-secret"])

    class Held(AuthQuery):
        async def _query(self, *args: Any) -> str | None:
            self.queries += 1
            started.set()
            await release.wait()
            return next(answers)

    aq = Held(lambda *a: None)  # type: ignore[arg-type,return-value]
    before = asyncio.ensure_future(aq.lookup(config, db, "u"))
    await started.wait()  # the lookup is in flight
    aq.reload()
    after = asyncio.ensure_future(aq.lookup(config, db, "u"))  # must not join the old one
    release.set()
    assert await before == "old-secret"
    assert await after == "new-secret"
    assert aq.queries == 2
    assert await aq.lookup(config, db, "u") == "new-secret"  # cached, from the new generation
    assert aq.queries == 2


# --- the mock-auth key across workers ------------------------------------------------------------


def test_mock_key_comes_from_the_environment(tmp_path: Any) -> None:
    """A process started with PGPROXY_MOCK_AUTH_KEY derives mock salts and plain-password
    verifier salts from it: two processes with the same key agree, with another they do not."""
    import subprocess
    import sys

    script = (
        "import asyncio; from pgproxy.auth import scram, frontend;"
        "v = asyncio.run(frontend._verifier_for_plain('bob', 'pw'));"
        "print(scram.ScramVerifier.mock('nobody').salt.hex(), v.salt.hex())"
    )

    def salts(key: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != scram.MOCK_KEY_ENV}
        if key is not None:
            env[scram.MOCK_KEY_ENV] = key
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, check=True, text=True
        )
        return out.stdout.strip()

    key = "ab" * 32
    assert salts(key) == salts(key)
    assert salts(key) != salts("cd" * 32)
    assert salts(None) != salts(None)  # no key given: a random one per process
    assert scram.parse_mock_key("zz") is None and scram.parse_mock_key("ab" * 8) is None
    assert scram.parse_mock_key(scram.new_mock_key()) is not None


def _probe_salt(port: int, user: str) -> bytes:
    """Run a doomed SCRAM login as ``user``; the salt the proxy announced."""
    client = scram_client.ScramClient("not-the-password")
    with RawClient(port) as c:
        c.startup(user, "postgres")
        auth = c.read_message()
        assert auth is not None and m.parse_authentication(auth[1])[0] == m.AUTH_SASL
        c.send(m.sasl_initial_response(scram.MECHANISM, client.client_first()))
        cont = c.read_message()
        assert cont is not None
        code, server_first = m.parse_authentication(cont[1])
        assert code == m.AUTH_SASL_CONTINUE
        c.send(m.password_message(client.handle_server_first(server_first)))
        error = c.read_message()
        assert error is not None and error[0] == "E"
    attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
    return attrs[b"s"]


def test_every_worker_announces_the_same_salt_for_an_unknown_user(
    pg: PgCluster, tmp_path: Any
) -> None:
    """With workers = 2, the supervisor gives both workers one mock key: an unknown user's
    salt does not depend on the worker (it would give the user away), even after a worker
    has been killed and restarted. Which worker answered is read from its log line."""
    from tests.test_workers import supervisor

    extra = f'auth_type = "scram-sha-256"\n[users.{AQ_USER}]\npassword = "plain-pw"'
    with supervisor(tmp_path, pg, extra=extra) as sup:

        def salts_by_worker(user: str) -> dict[int, set[bytes]]:
            found: dict[int, set[bytes]] = {}
            for _ in range(200):
                mark = sup.mark()
                salt = _probe_salt(sup.port, user)
                line = sup.wait_for(r"\[worker (\d+)\]: password authentication failed", mark)
                found.setdefault(int(line[1]), set()).add(salt)
                if len(found) == 2:
                    return found
            raise AssertionError(f"200 logins, all served by worker(s) {sorted(found)}")

        for user in ("aq_nobody", AQ_USER):  # unknown, and a plain password's verifier
            by_worker = salts_by_worker(user)
            assert len(set().union(*by_worker.values())) == 1, (user, by_worker)
        before = salts_by_worker("aq_nobody")
        mark = sup.mark()
        os.kill(sup.workers[0], signal.SIGKILL)
        sup.wait_for(r"worker 0 \(pid \d+\) ready", mark, timeout=30)
        assert salts_by_worker("aq_nobody") == before
