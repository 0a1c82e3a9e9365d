"""pgproxy: a PostgreSQL pooling proxy that multiplexes LISTEN/NOTIFY in transaction mode."""

import functools


def compiled() -> bool:
    """True if the hot modules run compiled with mypyc (PGPROXY_COMPILE=1, see setup.py)."""
    from pgproxy import backend

    return (backend.__file__ or "").endswith((".so", ".pyd"))


@functools.cache
def version() -> str:
    """pgproxy's version: the installed package's, else pyproject.toml's (a source checkout
    that was never pip-installed), else "unknown"."""
    import tomllib
    from importlib import metadata
    from pathlib import Path

    try:
        return metadata.version("pgproxy")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return "unknown"
