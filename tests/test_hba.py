"""``[[hba]]`` access rules: parsing with key-naming errors, first match wins, default deny."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgproxy.auth import hba
from pgproxy.config import ConfigError, parse_config
from pgproxy.protocol import messages as m
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy, pg_server_url
from tests.support.raw import RawClient, error_of

ALICE = {"alice": {"password": "alice-pw"}, "bob": {"password": "bob-pw"}}


def rule(**kw: Any) -> dict[str, Any]:
    return {"database": "all", "user": "all", "address": "all", "method": "trust", **kw}


def decide(rules: list[dict[str, Any]], **conn: Any) -> str:
    parsed = hba.parse_rules(rules)
    args = {"database": "app", "user": "alice", "address": "127.0.0.1", "tls": False, **conn}
    return hba.decide(parsed, "md5", **args)


# --- matching ------------------------------------------------------------------------------------


def test_no_rules_means_the_proxy_auth_type() -> None:
    assert decide([]) == "md5"


def test_first_matching_rule_wins() -> None:
    rules = [rule(user="bob", method="reject"), rule(method="scram-sha-256"), rule()]
    assert decide(rules) == "scram-sha-256"
    with pytest.raises(Exception, match="rejects connection"):
        decide(rules, user="bob")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [("10.1.2.3", True), ("127.0.0.1", False), ("::ffff:10.0.0.1", True), ("::1", False)],
)
def test_cidr_match(address: str, allowed: bool) -> None:
    rules = [rule(address=["10.0.0.0/8", "192.168.0.0/16"])]
    if allowed:
        assert decide(rules, address=address) == "trust"
    else:
        with pytest.raises(Exception, match="no pgproxy \\[\\[hba\\]\\] rule"):
            decide(rules, address=address)


@pytest.mark.parametrize(
    ("address", "tcp", "unix"),
    [("all", True, True), ("local", False, True), (["local", "10.0.0.0/8"], True, True),
     ("10.0.0.0/8", True, False)],
)  # fmt: skip
def test_local_names_the_unix_socket(address: Any, tcp: bool, unix: bool) -> None:
    rules = [rule(address=address, method="md5")]

    def admitted(**conn: Any) -> bool:
        try:
            return decide(rules, **conn) == "md5"
        except Exception as exc:
            assert getattr(exc, "sqlstate", None) == "28000"
            return False

    assert admitted(address="10.1.2.3") is tcp
    assert admitted(address=None, local=True) is unix


def test_a_refused_unix_client_is_named_local() -> None:
    with pytest.raises(Exception, match=r'rule for host "\[local\]", user "alice"'):
        decide([rule(address="10.0.0.0/8")], address=None, local=True)


def test_database_user_and_tls_filters() -> None:
    rules = [rule(database=["app"], user=["alice"], tls=True, method="md5")]
    assert decide(rules, tls=True) == "md5"
    for conn in ({"tls": False}, {"database": "other", "tls": True}, {"user": "bob", "tls": True}):
        with pytest.raises(Exception, match="no pgproxy"):
            decide(rules, **conn)


def test_default_deny_error_names_everything() -> None:
    with pytest.raises(Exception) as exc:
        decide([rule(address="10.0.0.0/8")], user="u1", database="d1", address="127.0.0.1")
    err = exc.value
    assert getattr(err, "sqlstate", None) == "28000"
    assert str(getattr(err, "message", "")) == (
        'no pgproxy [[hba]] rule for host "127.0.0.1", user "u1", database "d1", no encryption'
    )


# --- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (rule(method="password"), "hba[0].method: must be one of"),
        (rule(address="10.0.0.1/8"), "hba[0].address: '10.0.0.1/8' is not a CIDR address"),
        (rule(address="nowhere"), "hba[0].address: 'nowhere' is not a CIDR address"),
        (rule(user=[]), "hba[0].user: must not be an empty list"),
        (rule(user=["all", "bob"]), 'hba[0].user: "all" cannot be combined'),
        (rule(database=5), "hba[0].database: must be a non-empty string"),
        (rule(tls="yes"), "hba[0].tls: must be true or false"),
        (rule(methd="md5"), "hba[0]: unknown key 'methd'"),
        ({"database": "all", "user": "all", "method": "md5"}, "hba[0].address: required key"),
    ],
)
def test_bad_rules_name_the_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"hba": [entry]})
    assert str(exc.value).startswith(message), str(exc.value)


def test_hba_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError, match=r"^hba: must be an array of tables"):
        parse_config({"hba": {"method": "trust"}})


# --- through the proxy ---------------------------------------------------------------------------


def _first_answer(proxy: Any, user: str) -> tuple[str, bytes]:
    with RawClient(proxy.port, timeout=5) as c:
        c.startup(user)
        msg = c.read_message()
        assert msg is not None
        return msg


def _auth_request(proxy: Any, user: str) -> int:
    """The authentication code the proxy answers a startup packet with (0 = Ok)."""
    type_, body = _first_answer(proxy, user)
    assert type_ == "R", m.parse_error_fields(body)
    return m.parse_authentication(body)[0]


def _refusal(proxy: Any, user: str) -> dict[str, str]:
    """The FATAL the proxy answers a startup packet with, before any password exchange."""
    type_, body = _first_answer(proxy, user)
    assert type_ == "E", (type_, body)
    fields = m.parse_error_fields(body)
    assert fields["S"] == "FATAL"
    return fields


def test_a_rule_for_another_network_refuses_localhost(make_proxy: MakeProxy) -> None:
    p = make_proxy(hba=[rule(address="10.0.0.0/8")])
    fields = _refusal(p, "postgres")
    assert fields["C"] == "28000"
    assert fields["M"].startswith('no pgproxy [[hba]] rule for host "127.0.0.1", user "postgres"')
    with pytest.raises(psycopg.OperationalError, match="no pgproxy"):
        psycopg.connect(p.dsn(), connect_timeout=5)


def test_reject_method_and_fallthrough(make_proxy: MakeProxy) -> None:
    p = make_proxy(
        hba=[rule(user="nobody", method="reject"), rule(address="127.0.0.0/8")],
    )
    fields = _refusal(p, "nobody")
    assert fields["C"] == "28000"
    assert "rule rejects connection" in fields["M"]
    with psycopg.connect(p.dsn(), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_md5_or_scram_per_rule(make_proxy: MakeProxy, pg: PgCluster) -> None:
    p = make_proxy(
        proxy={"auth_type": "trust"},
        users=ALICE,
        databases={"*": {"url": pg_server_url(pg), "user": "postgres"}},
        hba=[
            rule(user="alice", method="md5"),
            rule(user="bob", method="scram-sha-256"),
        ],
    )
    assert _auth_request(p, "alice") == m.AUTH_MD5
    assert _auth_request(p, "bob") == m.AUTH_SASL
    for user in ("alice", "bob"):
        with psycopg.connect(p.dsn(user=user, password=f"{user}-pw"), connect_timeout=5) as c:
            assert c.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn(user=user, password="wrong"), connect_timeout=5)


def test_rules_are_reloaded(make_proxy: MakeProxy, pg: PgCluster) -> None:
    p = make_proxy()
    with psycopg.connect(p.dsn(), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    strict = parse_config(
        {
            "proxy": {"listen": "127.0.0.1:0"},
            "databases": {"*": {"url": pg_server_url(pg)}},
            "hba": [rule(address="10.0.0.0/8")],
        }
    )
    p.call(lambda proxy: proxy.reload(strict))
    with pytest.raises(psycopg.OperationalError, match="no pgproxy"):
        psycopg.connect(p.dsn(), connect_timeout=5)


def test_shipped_hba_example_is_valid() -> None:
    """The commented [[hba]] block of config/pgproxy.toml, uncommented, parses as documented."""
    import tomllib
    from pathlib import Path

    text = (Path(__file__).parent.parent / "config" / "pgproxy.toml").read_text()
    block = text[text.index("\n# [[hba]]\n") :]
    lines = [
        line[2:] for line in block.splitlines() if line.startswith("# ") and "# # " not in line
    ]
    rules = parse_config(tomllib.loads("\n".join(lines))).hba
    assert len(rules) == 2
    assert rules[0].method == "scram-sha-256" and rules[0].tls is True
    assert hba.decide(rules, "trust", database="app", user="x", address="10.1.1.1", tls=True) == (
        "scram-sha-256"
    )
    assert (
        hba.decide(rules, "trust", database="x", user="postgres", address="127.0.0.1", tls=False)
        == "md5"
    )


# --- names longer than NAMEDATALEN - 1 -----------------------------------------------------------

LONG_USER = "r" * 63  # the longest name Postgres keeps whole


@pytest.mark.parametrize(
    ("name", "cut"),
    [
        ("x", "x"),
        (LONG_USER, LONG_USER),
        (LONG_USER + "XYZ", LONG_USER),
        ("a" * 62 + "é" + "b", "a" * 62),  # é is 2 bytes: never split it
        ("é" * 40, "é" * 31),
        ("a" * 61 + "€", "a" * 61),  # 3 bytes
        ("a" * 62 + "\udcff" + "zz", "a" * 62 + "\udcff"),  # a raw non-UTF-8 byte counts as 1
    ],
)
def test_truncate_name(name: str, cut: str) -> None:
    assert hba.truncate_name(name) == cut
    assert len(cut.encode("utf-8", "surrogateescape")) <= hba.NAME_MAX_BYTES


def _login_error(p: Any, user: str, database: str = "postgres") -> str:
    with RawClient(p.port) as c:
        c.startup(user, database)
        err = error_of(c.read_all())
    assert err is not None
    return err["M"]


def test_a_long_user_name_cannot_bypass_a_rule(make_proxy: MakeProxy) -> None:
    """Postgres logs in as the first 63 bytes of the startup user name: the rules must be
    checked against that role too, not against the longer name the client sent."""
    p = make_proxy(hba=[rule(user=LONG_USER, method="reject"), rule()])
    with pytest.raises(psycopg.OperationalError, match="rule rejects"):
        psycopg.connect(p.dsn(user=LONG_USER), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match=f'rule rejects .*user "{LONG_USER}"'):
        psycopg.connect(p.dsn(user=LONG_USER + "XYZ"), connect_timeout=5)
    # Multibyte names are cut at a character boundary, the same way Postgres' lookup sees them.
    p2 = make_proxy(hba=[rule(user="é" * 31, method="reject"), rule()])
    assert "rule rejects" in _login_error(p2, "é" * 40)


def test_a_long_database_name_cannot_bypass_a_rule(make_proxy: MakeProxy) -> None:
    long_db = "d" * 63
    p = make_proxy(hba=[rule(database=long_db, method="reject"), rule()])
    assert "rule rejects" in _login_error(p, "postgres", long_db + "-and-more")
