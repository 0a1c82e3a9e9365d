"""Where settings come from, and which source wins.

Lowest to highest precedence: built-in defaults, a TOML file, environment variables
(``environment.py``: ``PGPROXY_<SETTING>``, ``DATABASE_URL``, ``DATABASE_URLS``) and explicit
arguments (the CLI). Owns reading the file and picking each override with the label its errors
carry (``--listen`` or ``PGPROXY_LISTEN``). The rule: this module only gathers inputs;
everything it gathers is checked by ``validate.py``, so a reload (``load_config`` again)
validates exactly like a start.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgproxy.config.environment import (
    ENV_CONFIG,
    ENV_LISTEN,
    database_urls,
    proxy_values,
    star_url,
)
from pgproxy.config.schema import Config, ConfigError
from pgproxy.config.validate import Overrides, build


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (at byte {exc.start})") from None


def _pick(
    arg: str | None, arg_label: str, env: Mapping[str, str], var: str
) -> tuple[str, str] | None:
    if arg is not None:
        return arg, arg_label
    if env.get(var):
        return env[var], var
    return None


def load_config(
    path: Path | str | None = None,
    *,
    listen: str | None = None,
    upstream: str | None = None,
    pool_mode: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load defaults < TOML file < environment < keyword arguments.

    ``PGPROXY_LISTEN`` wins over ``PGPROXY_LISTEN_HOST``/``PGPROXY_LISTEN_PORT``, and
    ``--listen`` over all three.

    The file is ``path`` or else ``$PGPROXY_CONFIG``; with neither, only built-in
    defaults apply.  Keyword-argument errors are labelled with the matching CLI flag
    (``--listen`` ...) since that is where they normally come from.  Empty environment
    variables count as unset.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None and environ.get(ENV_CONFIG):
        path = environ[ENV_CONFIG]
    source = Path(path).expanduser() if path is not None else None
    data = _read_toml(source) if source is not None else {}
    overrides = Overrides(
        listen=_pick(listen, "--listen", environ, ENV_LISTEN),
        upstream=(upstream, "--upstream") if upstream is not None else star_url(environ),
        pool_mode=(pool_mode, "--pool-mode") if pool_mode is not None else None,
        proxy=proxy_values(environ),
        databases=database_urls(environ),
    )
    return build(data, source, overrides)
