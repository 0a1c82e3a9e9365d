"""Behaviour of pgproxy.config and the argument half of pgproxy.cli."""

import os
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pgproxy.cli import build_arg_parser, config_from_args, main
from pgproxy.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    ProxySettings,
    UserConfig,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "pgproxy.toml"
NO_ENV: Mapping[str, str] = {}

# A valid SCRAM-SHA-256 verifier (password "alice-secret").
SCRAM = (
    "SCRAM-SHA-256$4096:cGdwcm94eS1leGFtcGxlIQ==$"
    "Iey6cAeLeT+WszdStvE/BidNL/AP/QP8avfewMVSifc=:43o/pMs6wpq1JINSRxrbWB7PXPoZLdDJgVjh8flWVe0="
)


def write(tmp_path: Path, text: str, name: str = "pgproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(data: Mapping[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def db(url: str, **keys: Any) -> dict[str, Any]:
    return {"databases": {"app": {"url": url, **keys}}}


# --------------------------------------------------------------------------- defaults


def test_defaults_with_nothing_given() -> None:
    cfg = load_config(env=NO_ENV)
    assert cfg.proxy == ProxySettings()
    assert (cfg.proxy.listen_host, cfg.proxy.listen_port) == ("127.0.0.1", 6432)
    assert cfg.proxy.pool_mode == "transaction"
    assert list(cfg.databases) == ["*"]
    star = cfg.databases["*"]
    assert star.url == "postgresql://127.0.0.1:5432"
    assert (star.host, star.port, star.dbname, star.user, star.password) == (
        "127.0.0.1",
        5432,
        None,
        None,
        None,
    )
    assert cfg.users == {}
    assert cfg.source is None


def test_parse_config_of_empty_document_equals_defaults() -> None:
    assert parse_config({}) == load_config(env=NO_ENV)


def test_file_without_databases_gets_star_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[proxy]\npool_mode = "session"\n'), env=NO_ENV)
    assert list(cfg.databases) == ["*"]
    assert cfg.databases["*"].url == "postgresql://127.0.0.1:5432"
    assert cfg.proxy.pool_mode == "session"


def test_file_with_databases_gets_no_star(tmp_path: Path) -> None:
    path = write(tmp_path, '[databases.app]\nurl = "postgresql://db1/app"\n')
    cfg = load_config(path, env=NO_ENV)
    assert list(cfg.databases) == ["app"]
    assert cfg.database_for("other") is None
    assert cfg.source == path


# --------------------------------------------------------------------------- shipped example


def test_shipped_example_loads_and_equals_defaults() -> None:
    cfg = load_config(EXAMPLE, env=NO_ENV)
    defaults = load_config(env=NO_ENV)
    assert cfg.proxy == defaults.proxy
    assert cfg.databases == defaults.databases
    assert cfg.users == defaults.users
    assert cfg.source == EXAMPLE


def test_shipped_example_documents_every_proxy_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    keys = {
        f for f in ProxySettings.__dataclass_fields__ if f not in ("listen_host", "listen_port")
    }
    assert set(data["proxy"]) == keys | {"listen"}


def test_shipped_commented_examples_are_valid() -> None:
    # Uncomment the "# [databases.app]" / "# [users.alice]" blocks ("# # " stays a comment).
    lines, in_example = [], False
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line in ("# [databases.app]", "# [users.alice]"):
            in_example = True
        elif not line.startswith("#"):
            in_example = False
        if in_example and line.startswith("# ") and not line.startswith("# # "):
            line = line[2:]
        lines.append(line)
    cfg = parse_config(tomllib.loads("\n".join(lines)))
    app = cfg.databases["app"]
    assert (app.host, app.port, app.dbname, app.user) == (
        "db1.internal",
        5432,
        "app_production",
        "app",
    )
    assert app.password == "s3cret@pw"
    assert app.url_params == {"sslmode": "require"}
    assert cfg.users["alice"].password == SCRAM
    assert cfg.pool_size_for(app, "alice") == 5


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"proxy": {"pool_sise": 3}}, "proxy: unknown key 'pool_sise'"),
        ({"proxi": {}}, "proxi: unknown section"),
        (db("postgresql://h/app", pool_sise=3), "databases.app: unknown key 'pool_sise'"),
        ({"users": {"bob": {"pasword": "x"}}}, "users.bob: unknown key 'pasword'"),
        ({"proxy": {"max_client_conn": "10"}}, "proxy.max_client_conn: must be an integer"),
        ({"proxy": {"default_pool_size": True}}, "proxy.default_pool_size: must be an integer"),
        ({"proxy": {"query_wait_timeout": False}}, "proxy.query_wait_timeout: must be a number"),
        (db("postgresql://h/app", pool_size=True), "databases.app.pool_size: must be an integer"),
        ({"users": {"bob": {"pool_size": 1.5}}}, "users.bob.pool_size: must be an integer"),
        ({"proxy": {"pool_mode": "foo"}}, "proxy.pool_mode: must be one of 'session', "),
        (db("postgresql://h/app", pool_mode="x"), "databases.app.pool_mode: must be one of"),
        ({"users": {"bob": {"pool_mode": 1}}}, "users.bob.pool_mode: must be one of"),
        ({"proxy": {"auth_type": "md6"}}, "proxy.auth_type: must be one of 'trust'"),
        ({"proxy": {"log_level": "loud"}}, "proxy.log_level: must be one of 'debug'"),
        ({"proxy": {"listen": "localhost"}}, "proxy.listen: must be 'HOST:PORT'"),
        ({"proxy": {"listen": ":6432"}}, "proxy.listen: must be 'HOST:PORT'"),
        ({"proxy": {"listen": "::1:6432"}}, "brackets"),
        ({"proxy": {"listen": "[nope]:6432"}}, "proxy.listen: 'nope' is not an IPv6"),
        ({"proxy": {"listen": "h:70000"}}, "proxy.listen: port must be between 0 and 65535"),
        ({"proxy": {"listen": 6432}}, "proxy.listen: must be a string"),
        ({"proxy": {"max_client_conn": 0}}, "proxy.max_client_conn: must be >= 1"),
        ({"proxy": {"default_pool_size": 0}}, "proxy.default_pool_size: must be >= 1"),
        ({"proxy": {"server_lifetime": -1}}, "proxy.server_lifetime: must be a finite number"),
        ({"proxy": {"server_lifetime": float("inf")}}, "proxy.server_lifetime: must be a finite"),
        (
            {"proxy": {"min_pool_size": 30}},
            "proxy.min_pool_size: must be <= proxy.default_pool_size (20) (got 30)",
        ),
        (
            db("postgresql://h/app", pool_size=5, min_pool_size=6),
            "databases.app.min_pool_size: must be <= databases.app.pool_size (5) (got 6)",
        ),
        (
            {"proxy": {"min_pool_size": 4}, **db("postgresql://h/app", pool_size=3)},
            "databases.app.pool_size: must be >= proxy.min_pool_size (4) (got 3)",
        ),
        (
            {**db("postgresql://h/app", min_pool_size=4), "users": {"bob": {"pool_size": 2}}},
            "users.bob.pool_size: must be >= databases.app.min_pool_size (4) (got 2)",
        ),
        (db("mysql://h/app"), "databases.app.url: must be a 'postgresql://' or 'postgres://' URL"),
        (db("127.0.0.1:5432"), "databases.app.url: must be a 'postgresql://'"),
        (db("postgresql:h/app"), "databases.app.url: must be a 'postgresql://'"),
        (db("postgresql://h:99999/app"), "databases.app.url: URL has an invalid port"),
        (db("postgresql://h:0/app"), "databases.app.url: URL port must be between 1 and 65535"),
        (db("postgresql://h1,h2/app?port=1,2,3"), "databases.app.url: URL has 2 hosts but 3"),
        (db("postgresql://h1,h2:x/app"), "databases.app.url: URL has an invalid port"),
        (db("postgresql://h1,h2/app?target_session_attrs=master"), "target_session_attrs: must"),
        (db("postgresql://h1,h2/app?load_balance_hosts=yes"), "load_balance_hosts: must be"),
        (db("postgresql://[::1/app"), "databases.app.url: not a valid URL"),
        (db("postgresql://h/app?sslmode=a&sslmode=b"), "'sslmode' given twice"),
        ({"databases": {"app": {}}}, "databases.app.url: required key is missing"),
        ({"databases": {"app": "postgresql://h"}}, "databases.app: must be a table"),
        ({"databases": {"*": {"url": 5}}}, 'databases."*".url: must be a string'),
        ({"users": {"bob": {"password": "SCRAM-SHA-256$x"}}}, "users.bob.password: malformed"),
    ],
)
def test_validation_error_names_key(data: Mapping[str, Any], expected: str) -> None:
    assert expected in config_error(data)


def test_unknown_key_suggests_close_match() -> None:
    assert "did you mean 'pool_size'?" in config_error(db("postgresql://h", pool_sise=1))


def test_ints_accepted_for_float_settings_and_log_level_case() -> None:
    cfg = parse_config({"proxy": {"query_wait_timeout": 5, "log_level": "DEBUG"}})
    assert cfg.proxy.query_wait_timeout == 5.0
    assert isinstance(cfg.proxy.query_wait_timeout, float)
    assert cfg.proxy.log_level == "debug"


def test_listen_forms() -> None:
    def listen(text: str) -> tuple[str, int]:
        proxy = parse_config({"proxy": {"listen": text}}).proxy
        return proxy.listen_host, proxy.listen_port

    assert listen("0.0.0.0:5000") == ("0.0.0.0", 5000)
    assert listen("localhost:0") == ("localhost", 0)
    assert listen("[::1]:6432") == ("::1", 6432)
    assert listen("[::]:6433") == ("::", 6433)


# --------------------------------------------------------------------------- files


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(missing, env=NO_ENV)


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\npool_mode = "session"\nlisten = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=NO_ENV)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_file_key_errors_name_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\npool_mode = "foo"\n')
    with pytest.raises(ConfigError, match=r"proxy.pool_mode: must be one of .* \(got 'foo'\)"):
        load_config(path, env=NO_ENV)


# --------------------------------------------------------------------------- URLs


def test_url_full_parse() -> None:
    cfg = parse_config(
        db("postgresql://bob:p%40ss%23w%2Frd@db.example:6000/my%20db?sslmode=verify-full")
    )
    app = cfg.databases["app"]
    assert (app.host, app.port, app.dbname, app.user) == ("db.example", 6000, "my db", "bob")
    assert app.password == "p@ss#w/rd"
    assert app.url_params == {"sslmode": "verify-full"}
    assert app.url == "postgresql://bob:***@db.example:6000/my%20db?sslmode=verify-full"


def test_url_ipv6_host() -> None:
    app = parse_config(db("postgres://[::1]:5433/app")).databases["app"]
    assert (app.host, app.port, app.dbname) == ("::1", 5433, "app")


def test_url_defaults() -> None:
    app = parse_config(db("postgresql://")).databases["app"]
    assert (app.host, app.port, app.dbname, app.user, app.password) == (
        "127.0.0.1",
        5432,
        None,
        None,
        None,
    )
    app = parse_config(db("postgresql:///only_db")).databases["app"]
    assert (app.host, app.port, app.dbname) == ("127.0.0.1", 5432, "only_db")


def test_url_query_connection_params_like_libpq() -> None:
    url = "postgresql://h/app?user=u2&password=pw2&port=5999&application_name=x"
    app = parse_config(db(url)).databases["app"]
    assert (app.user, app.password, app.port) == ("u2", "pw2", 5999)
    assert app.url_params == {"application_name": "x"}
    assert "pw2" not in app.url


def test_user_and_password_keys_override_url() -> None:
    url = "postgresql://urluser:urlpw@h/app"
    app = parse_config(db(url, user="keyuser", password="keypw")).databases["app"]
    assert (app.user, app.password) == ("keyuser", "keypw")


def test_database_config_direct_construction_derives_url() -> None:
    d = DatabaseConfig(name="x", host="::1", port=5433, dbname="a b")
    assert d.url == "postgresql://[::1]:5433/a%20b"
    assert d.url_params == {}
    hash(d)  # usable as a dict key


# --------------------------------------------------------------------------- secrets


SECRET = "hunter2-SECRET"


def test_passwords_not_in_repr() -> None:
    cfg = parse_config(
        {
            "databases": {
                "a": {"url": f"postgresql://u:{SECRET}@h/a?sslpassword={SECRET}x"},
                "b": {"url": "postgresql://h/b", "password": SECRET},
            },
            "users": {"alice": {"password": SECRET}},
        }
    )
    assert cfg.databases["a"].password == SECRET
    assert cfg.databases["a"].url_params["sslpassword"] == SECRET + "x"
    assert cfg.databases["b"].password == SECRET
    assert cfg.users["alice"].password == SECRET
    for obj in (cfg, cfg.databases["a"], cfg.databases["b"], cfg.users["alice"]):
        assert SECRET not in repr(obj)
        assert SECRET not in str(obj)
    assert "***" in repr(cfg.users["alice"])


@pytest.mark.parametrize(
    "data",
    [
        db(f"mysql://u:{SECRET}@h/app"),
        db(f"postgresql://u:{SECRET}#@h/app"),
        db(f"postgresql://u:{SECRET}@h:{SECRET}/app"),
        db(f"postgresql://u:{SECRET}@h/app?port={SECRET}"),
        db(f"postgresql://u:{SECRET}@h/app?{SECRET}"),
        db(f"postgresql://u:{SECRET}@h/app?a=1&a=2"),
        db("postgresql://h/app", password=12345),
        {"users": {"alice": {"password": ["x", SECRET]}}},
        {"users": {"alice": {"password": f"SCRAM-SHA-256${SECRET}"}}},
    ],
)
def test_passwords_not_in_error_messages(data: Mapping[str, Any]) -> None:
    message = config_error(data)
    assert SECRET not in message
    assert "12345" not in message
    assert message.startswith(("databases.app", "users.alice"))


def test_password_not_in_error_from_env() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"PGPROXY_UPSTREAM": f"postgresql://u:{SECRET}@h:x/db"})
    assert str(info.value).startswith("PGPROXY_UPSTREAM: ")
    assert SECRET not in str(info.value)


# --------------------------------------------------------------------------- precedence


def test_precedence_file_env_args(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[proxy]\nlisten = "10.0.0.1:1111"\npool_mode = "session"\n'
        '[databases."*"]\nurl = "postgresql://filehost/x"\npool_size = 7\n',
    )
    env = {
        "PGPROXY_CONFIG": str(path),
        "PGPROXY_LISTEN": "10.0.0.2:2222",
        "PGPROXY_UPSTREAM": "postgresql://envhost",
    }

    from_file = load_config(env={"PGPROXY_CONFIG": str(path)})
    assert from_file.source == path
    assert (from_file.proxy.listen_host, from_file.proxy.listen_port) == ("10.0.0.1", 1111)
    assert from_file.databases["*"].host == "filehost"

    from_env = load_config(env=env)
    assert (from_env.proxy.listen_host, from_env.proxy.listen_port) == ("10.0.0.2", 2222)
    assert from_env.databases["*"].host == "envhost"
    assert from_env.databases["*"].pool_size == 7  # other keys of "*" are kept
    assert from_env.proxy.pool_mode == "session"

    from_args = load_config(
        env=env, listen="[::1]:3333", upstream="postgresql://arghost", pool_mode="transaction"
    )
    assert (from_args.proxy.listen_host, from_args.proxy.listen_port) == ("::1", 3333)
    assert from_args.databases["*"].host == "arghost"
    assert from_args.proxy.pool_mode == "transaction"


def test_explicit_path_beats_env_path(tmp_path: Path) -> None:
    a = write(tmp_path, '[proxy]\npool_mode = "session"\n', "a.toml")
    b = write(tmp_path, '[proxy]\npool_mode = "transaction"\n', "b.toml")
    cfg = load_config(b, env={"PGPROXY_CONFIG": str(a)})
    assert (cfg.source, cfg.proxy.pool_mode) == (b, "transaction")


def test_upstream_adds_star_next_to_named_databases(tmp_path: Path) -> None:
    path = write(tmp_path, '[databases.app]\nurl = "postgresql://db1/app"\n')
    cfg = load_config(path, upstream="postgresql://fallback", env=NO_ENV)
    assert set(cfg.databases) == {"app", "*"}


def test_override_errors_are_labelled_by_origin() -> None:
    with pytest.raises(ConfigError, match=r"^PGPROXY_LISTEN: "):
        load_config(env={"PGPROXY_LISTEN": "nonsense"})
    with pytest.raises(ConfigError, match=r"^--listen: "):
        load_config(listen="nonsense", env=NO_ENV)
    with pytest.raises(ConfigError, match=r"^--pool-mode: must be one of"):
        load_config(pool_mode="statement", env=NO_ENV)
    with pytest.raises(ConfigError, match=r"^--upstream: "):
        load_config(upstream="http://x", env=NO_ENV)


def test_empty_env_vars_count_as_unset() -> None:
    cfg = load_config(env={"PGPROXY_CONFIG": "", "PGPROXY_LISTEN": "", "PGPROXY_UPSTREAM": ""})
    assert cfg == load_config(env=NO_ENV)


# --------------------------------------------------------------------------- lookups


def test_database_for_exact_then_star() -> None:
    cfg = parse_config(
        {
            "databases": {
                "app": {"url": "postgresql://db1/app_prod"},
                "*": {"url": "postgresql://db2"},
            }
        }
    )
    assert cfg.database_for("app") is cfg.databases["app"]
    assert cfg.database_for("other") is cfg.databases["*"]
    assert cfg.database_for("other") is not None
    assert cfg.databases["*"].dbname is None  # same name as the client's


def test_pool_mode_and_size_precedence() -> None:
    cfg = parse_config(
        {
            "proxy": {"pool_mode": "transaction", "default_pool_size": 10},
            "databases": {
                "plain": {"url": "postgresql://h/plain"},
                "tuned": {"url": "postgresql://h/tuned", "pool_mode": "session", "pool_size": 5},
            },
            "users": {
                "alice": {"pool_mode": "transaction", "pool_size": 2},
                "bob": {"password": "x"},
            },
        }
    )
    plain, tuned = cfg.databases["plain"], cfg.databases["tuned"]
    assert cfg.pool_mode_for(plain, "nobody") == "transaction"
    assert cfg.pool_size_for(plain, "nobody") == 10
    assert cfg.pool_mode_for(tuned, "bob") == "session"
    assert cfg.pool_size_for(tuned, "bob") == 5
    assert cfg.pool_mode_for(tuned, "alice") == "transaction"
    assert cfg.pool_size_for(tuned, "alice") == 2
    assert cfg.pool_size_for(plain, "alice") == 2
    assert cfg.min_pool_size_for(plain) == 0


def test_config_is_immutable() -> None:
    cfg = load_config(env=NO_ENV)
    with pytest.raises(AttributeError):
        cfg.proxy.listen_port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.databases["x"] = cfg.databases["*"]  # type: ignore[index]
    assert isinstance(cfg, Config)
    assert isinstance(UserConfig(name="u"), UserConfig)


# --------------------------------------------------------------------------- CLI


def test_arg_parser_and_config_from_args(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nlisten = "127.0.0.1:1"\n')
    args = build_arg_parser().parse_args(
        ["--config", str(path), "--listen", "0.0.0.0:0", "--pool-mode", "session"]
    )
    cfg = config_from_args(args, env=NO_ENV)
    assert cfg.source == path
    assert (cfg.proxy.listen_host, cfg.proxy.listen_port) == ("0.0.0.0", 0)
    assert cfg.proxy.pool_mode == "session"
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--pool-mode", "statement"])


def test_main_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("PGPROXY_CONFIG", "PGPROXY_LISTEN", "PGPROXY_UPSTREAM"):
        monkeypatch.delenv(var, raising=False)
    assert main(["--check"]) == 0
    assert capsys.readouterr().out == "pgproxy: configuration OK (built-in defaults)\n"
    bad = write(tmp_path, "[proxy]\nmax_client_conn = true\n")
    assert main(["--check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgproxy: config error: proxy.max_client_conn: must be an integer")


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_module_check_good_file() -> None:
    result = _run_module("--check", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"pgproxy: configuration OK ({EXAMPLE})\n"


def test_module_check_bad_file(tmp_path: Path) -> None:
    bad = write(tmp_path, '[databases.app]\nurl = "postgresql://h/app"\npool_sise = 3\n')
    result = _run_module("--check", "--config", str(bad))
    assert result.returncode == 2
    assert "pgproxy: config error: databases.app: unknown key 'pool_sise'" in result.stderr


def test_module_version() -> None:
    result = _run_module("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "pgproxy 0.1.0"


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql://h1:5432,h2:5433/app", (("h1", 5432), ("h2", 5433))),
        ("postgresql://h1,h2:5433/app", (("h1", 5432), ("h2", 5433))),
        ("postgresql://u:pw@[::1]:5433,h2/app", (("::1", 5433), ("h2", 5432))),
        ("postgresql:///app?host=a,b&port=6000", (("a", 6000), ("b", 6000))),
        ("postgresql:///app?host=a,b&port=6000,6001", (("a", 6000), ("b", 6001))),
        ("postgresql://h1,h2/app?port=7000", (("h1", 7000), ("h2", 7000))),
        ("postgresql://h/app", (("h", 5432),)),
    ],
)
def test_multi_host_urls_list_every_host_in_order(url: str, hosts: tuple[object, ...]) -> None:
    """libpq's host lists: the URI's own or host=/port= (one port for all, or one each)."""
    app = parse_config(db(url)).databases["app"]
    assert app.hosts == hosts
    assert (app.host, app.port) == hosts[0]
    assert app.target_session_attrs == "any" and app.load_balance_hosts == "disable"


def test_target_session_attrs_and_load_balance_hosts_are_read_from_the_url() -> None:
    url = "postgresql://h1,h2/app?target_session_attrs=read-write&load_balance_hosts=random"
    app = parse_config(db(url)).databases["app"]
    assert (app.target_session_attrs, app.load_balance_hosts) == ("read-write", "random")
