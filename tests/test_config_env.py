"""Configuration from the environment (pgproxy.config.environment): a ``PGPROXY_<SETTING>``
variable for every ``[proxy]`` setting, ``DATABASE_URL``/``DATABASE_URLS``, where they stand in
the precedence, errors that name the variable, and README's table of them."""

import dataclasses
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from pgproxy.cli import main
from pgproxy.config import ConfigError, ProxySettings, env_table, load_config
from pgproxy.config.environment import convert, variable
from tests.support.process import ROOT

README = ROOT / "README.md"
TABLE = re.compile(r"<!-- env-table:start -->\n(.*?)<!-- env-table:end -->", re.S)
SECRET = "hunter2-s3cret"

# Values the generic samples below would not pass validation with.
SAMPLES = {
    "listen_host": "0.0.0.0",
    "log_level": "debug",
    "auth_query": "SELECT usename, passwd FROM lookup($1)",
    "auth_user": "lookup",  # needs a password method: the base environment sets md5
    "unix_socket_mode": "0700",
    "workers": "auto",
    "metrics_listen": "127.0.0.1:9127",
}
BASE = {"PGPROXY_AUTH_TYPE": "md5"}


def _sample(f: dataclasses.Field[Any]) -> str:
    """Text of a valid value different from the field's default."""
    if f.name in SAMPLES:
        return SAMPLES[f.name]
    if get_origin(f.type) is Literal:
        return next(choice for choice in get_args(f.type) if choice != f.default)
    if f.type is bool:
        return "false" if f.default else "true"
    if f.type is int:
        return str(f.default + 1)
    if f.type is float:
        return str(f.default + 1.5)
    if get_origin(f.type) in (list, tuple):
        return "alice, bob"
    return "sample"


def _expected(f: dataclasses.Field[Any], text: str) -> object:
    if f.name == "workers":
        return load_config(env={"PGPROXY_WORKERS": "auto"}).proxy.workers
    if f.name == "unix_socket_mode":
        return 0o700
    if get_origin(f.type) in (list, tuple):
        return get_origin(f.type)(["alice", "bob"])
    return convert(f.name, f.type, text)


@pytest.mark.parametrize("f", dataclasses.fields(ProxySettings), ids=lambda f: f.name)
def test_every_proxy_setting_has_a_variable(f: dataclasses.Field[Any]) -> None:
    text = _sample(f)
    settings = load_config(env={**BASE, variable(f.name): text}).proxy
    assert getattr(settings, f.name) == _expected(f, text)
    assert getattr(settings, f.name) != getattr(ProxySettings(), f.name) or f.name == "workers"


def test_text_converts_by_the_field_type() -> None:
    assert convert("x", bool, "Yes") is True
    assert convert("x", bool, "off") is False
    assert convert("x", bool, "maybe") == "maybe"  # left for the validator to reject
    assert convert("x", int, " 42 ") == 42
    assert convert("x", int, "4.2") == "4.2"
    assert convert("x", float, "2.5") == 2.5
    assert convert("x", tuple[str, ...], "a, b,,c ") == ["a", "b", "c"]
    assert convert("unix_socket_mode", int, "0o660") == 0o660
    assert convert("unix_socket_mode", int, "660") == 0o660
    assert convert("unix_socket_mode", int, "0999") == "0999"
    assert convert("workers", int, "auto") == "auto"
    with pytest.raises(TypeError, match="no environment conversion"):
        convert("x", dict[str, str], "a")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PGPROXY_DEFAULT_POOL_SIZE": "many"},
            "PGPROXY_DEFAULT_POOL_SIZE: must be an integer (got string 'many')",
        ),
        ({"PGPROXY_DEFAULT_POOL_SIZE": "0"}, "PGPROXY_DEFAULT_POOL_SIZE: must be >= 1 (got 0)"),
        (
            {"PGPROXY_POOL_MODE": "statement"},
            "PGPROXY_POOL_MODE: must be one of 'session', 'transaction' (got 'statement')",
        ),
        (
            {"PGPROXY_SERVER_LIFETIME": "soon"},
            "PGPROXY_SERVER_LIFETIME: must be a number of seconds (got string 'soon')",
        ),
        (
            {"PGPROXY_QUERY_WAIT_TIMEOUT": "-1"},
            "PGPROXY_QUERY_WAIT_TIMEOUT: must be a finite number >= 0 (got -1.0)",
        ),
        (
            {"PGPROXY_LISTEN_PORT": "70000"},
            "PGPROXY_LISTEN_PORT: must be between 0 and 65535 (got 70000)",
        ),
        (
            {"PGPROXY_LISTEN_HOST": "[::1]"},
            "PGPROXY_LISTEN_HOST: must be a host name or an IP address (got '[::1]')",
        ),
        (
            {"PGPROXY_UNIX_SOCKET_MODE": "rw"},
            "PGPROXY_UNIX_SOCKET_MODE: must be an integer (got string 'rw')",
        ),
        (
            {"PGPROXY_WORKERS": "many"},
            "PGPROXY_WORKERS: must be an integer or 'auto' (got string 'many')",
        ),
        (
            {"PGPROXY_MIN_POOL_SIZE": "30"},
            "proxy.min_pool_size: must be <= proxy.default_pool_size (20) (got 30)",
        ),
        (
            {"DATABASE_URLS": "app"},
            "DATABASE_URLS: entry 1 must be NAME=URL (entries separated by commas, "
            "e.g. app=postgresql://db1/app,*=postgresql://db2)",
        ),
        (
            {"DATABASE_URLS": "a=postgresql://h/a,a=postgresql://h/b"},
            "DATABASE_URLS (a): database given twice",
        ),
        (
            {"DATABASE_URLS": "a=postgresql://h/a,b=postgresql://h:x/b"},
            "DATABASE_URLS (b): URL has an invalid port",
        ),
        (
            {"DATABASE_URLS": "a=postgresql://h/a,b=http://h/b"},
            "DATABASE_URLS: entry 2 must be NAME=URL (entries separated by commas, "
            "e.g. app=postgresql://db1/app,*=postgresql://db2)",
        ),
        (
            {"DATABASE_URL": "postgresql://h1", "PGPROXY_UPSTREAM": "postgresql://h2"},
            "DATABASE_URL: differs from PGPROXY_UPSTREAM (set one of them)",
        ),
        (
            {"DATABASE_URL": "postgresql://h1", "DATABASE_URLS": "*=postgresql://h2"},
            "DATABASE_URLS (*): the database is also given by DATABASE_URL (set one)",
        ),
    ],
)
def test_invalid_values_are_errors_naming_the_variable(
    env: Mapping[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert str(info.value) == message


def test_passwords_in_database_urls_stay_out_of_errors() -> None:
    for env in (
        {"DATABASE_URL": f"postgresql://u:{SECRET}@h:x/db"},
        {"DATABASE_URLS": f"app=postgresql://u:{SECRET}@h:x/db"},
        {"DATABASE_URLS": f"app:{SECRET}"},
        {"DATABASE_URLS": f"postgresql://u:{SECRET}@h/db?sslmode=require"},  # NAME= forgotten
    ):
        with pytest.raises(ConfigError) as info:
            load_config(env=env)
        assert SECRET not in str(info.value)
        assert str(info.value).startswith(next(iter(env)))


def test_database_url_is_the_star_database() -> None:
    cfg = load_config(env={"DATABASE_URL": f"postgresql://app:{SECRET}@db1:6543/app"})
    star = cfg.databases["*"]
    assert (star.host, star.port, star.dbname, star.user, star.password) == (
        "db1",
        6543,
        "app",
        "app",
        SECRET,
    )
    same = {"DATABASE_URL": "postgresql://db1", "PGPROXY_UPSTREAM": "postgresql://db1"}
    assert load_config(env=same).databases["*"].host == "db1"


def test_database_urls_name_several_databases(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    path.write_text('[databases.app]\nurl = "postgresql://filehost/app"\npool_size = 7\n')
    env = {
        "PGPROXY_CONFIG": str(path),
        # A comma inside a URL's query string stays in it; a newline separates too.
        "DATABASE_URLS": (
            "app=postgresql://envhost/app?options=-c%20search_path=a,b, "
            "reports=postgres://r@rhost:5433/rep\n*=postgresql://fallback"
        ),
    }
    cfg = load_config(env=env)
    assert set(cfg.databases) == {"app", "reports", "*"}
    app = cfg.databases["app"]
    assert (app.host, app.pool_size) == ("envhost", 7)  # the file's other keys stay
    assert app.url_params == {"options": "-c search_path=a,b"}
    assert (cfg.databases["reports"].port, cfg.databases["reports"].user) == (5433, "r")
    assert cfg.databases["*"].host == "fallback"
    # Without "*", only the named databases exist, as in a file.
    only = load_config(env={"DATABASE_URLS": "app=postgresql://h/app"})
    assert set(only.databases) == {"app"}
    # --upstream still beats the environment for "*".
    argued = load_config(env=env, upstream="postgresql://arghost")
    assert argued.databases["*"].host == "arghost"


def test_precedence_defaults_file_environment_arguments(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    path.write_text('[proxy]\nlisten = "10.0.0.1:1111"\ndefault_pool_size = 7\n')
    file_env = {"PGPROXY_CONFIG": str(path)}
    assert load_config(env={}).proxy.default_pool_size == 20
    assert load_config(env=file_env).proxy.default_pool_size == 7
    env = {**file_env, "PGPROXY_DEFAULT_POOL_SIZE": "9", "PGPROXY_LISTEN_PORT": "2222"}
    settings = load_config(env=env).proxy
    assert (settings.default_pool_size, settings.listen_host, settings.listen_port) == (
        9,
        "10.0.0.1",
        2222,
    )
    settings = load_config(env={**env, "PGPROXY_LISTEN_HOST": "::"}).proxy
    assert (settings.listen_host, settings.listen_port) == ("::", 2222)
    # PGPROXY_LISTEN wins over its parts; --listen over all of them.
    settings = load_config(env={**env, "PGPROXY_LISTEN": "10.0.0.3:3333"}).proxy
    assert (settings.listen_host, settings.listen_port) == ("10.0.0.3", 3333)
    settings = load_config(env=env, listen="10.0.0.4:4444").proxy
    assert (settings.listen_host, settings.listen_port) == ("10.0.0.4", 4444)
    # An empty variable is unset.
    unset = load_config(env={**file_env, "PGPROXY_DEFAULT_POOL_SIZE": ""})
    assert unset.proxy.default_pool_size == 7


def test_no_setting_takes_the_name_of_another_variable() -> None:
    others = {"PGPROXY_CONFIG", "PGPROXY_LISTEN", "PGPROXY_UPSTREAM", "PGPROXY_MOCK_AUTH_KEY"}
    others |= {"PGPROXY_COMPILE", "PGPROXY_TEST_COMPILED", "PGPROXY_EXPECT_COMPILED"}
    assert not others & {variable(f.name) for f in dataclasses.fields(ProxySettings)}


# --------------------------------------------------------------------------- the table


def test_readme_table_is_the_generated_one() -> None:
    found = TABLE.search(README.read_text(encoding="utf-8"))
    assert found is not None, "README.md lacks the <!-- env-table:start/end --> block"
    assert found[1] == env_table(), "README's table is stale: run scripts/env-table"


def test_table_has_a_row_per_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--env-table"]) == 0
    table = capsys.readouterr().out
    assert table == env_table()
    for f in dataclasses.fields(ProxySettings):
        assert f"| `{variable(f.name)}` | " in table
    assert "| `PGPROXY_UNIX_SOCKET_MODE` | `proxy.unix_socket_mode` | octal integer | `0777` |" in (
        table
    )
    assert "| `PGPROXY_POOL_MODE` | `proxy.pool_mode` | `session`, `transaction` | " in table


def test_env_table_script_rewrites_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- env-table:start -->\nstale\n<!-- env-table:end -->\nafter\n")
    result = subprocess.run(
        [str(ROOT / "scripts" / "env-table"), str(readme)],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.endswith("<!-- env-table:end -->\nafter\n")
    found = TABLE.search(text)
    assert found is not None and found[1] == env_table()
