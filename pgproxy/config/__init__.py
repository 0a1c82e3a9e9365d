"""Configuration: what it is, where it comes from, and the checks between the two.

Settings come from, lowest to highest precedence: built-in defaults, a TOML file,
``PGPROXY_*`` environment variables and explicit arguments (the CLI). Everything is validated
once, so the rest of the proxy can trust a ``Config`` without re-checking it. Error messages
always start with the offending key path and never contain a password, because they end up on
terminals and in logs.

* ``schema``: the option types, defaults and dataclasses (``Config`` and its parts).
* ``values``: checkers for single values, upstream URLs included.
* ``validate``: whole documents and the rules that span keys (``parse_config``).
* ``environment``: ``PGPROXY_<SETTING>``, ``DATABASE_URL(S)`` and their table (``env_table``).
* ``loading``: the file, the environment and the arguments, in precedence order (``load_config``).

The rule: this package re-exports its public names and holds nothing else; its modules import
one another directly, never this package, and the dependencies run one way:
``loading`` -> ``validate`` -> ``values`` -> ``schema``, and ``loading`` -> ``environment`` ->
``schema``.
"""

from pgproxy.config.environment import ENV_CONFIG, ENV_LISTEN, ENV_UPSTREAM, env_table
from pgproxy.config.loading import load_config
from pgproxy.config.schema import (
    CONSOLE_DATABASES,
    DEFAULT_UPSTREAM_URL,
    RESTART_FIELDS,
    WILDCARD,
    AuthType,
    Config,
    ConfigError,
    DatabaseConfig,
    PoolMode,
    ProxySettings,
    UserConfig,
)
from pgproxy.config.validate import parse_config
from pgproxy.config.values import as_workers

__all__ = [
    "CONSOLE_DATABASES",
    "DEFAULT_UPSTREAM_URL",
    "ENV_CONFIG",
    "ENV_LISTEN",
    "ENV_UPSTREAM",
    "RESTART_FIELDS",
    "WILDCARD",
    "AuthType",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "PoolMode",
    "ProxySettings",
    "UserConfig",
    "as_workers",
    "env_table",
    "load_config",
    "parse_config",
]
