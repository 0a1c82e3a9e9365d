"""pgproxy: a PostgreSQL pooling proxy that multiplexes LISTEN/NOTIFY in transaction mode."""


def compiled() -> bool:
    """True if the hot modules run compiled with mypyc (PGPROXY_COMPILE=1, see setup.py)."""
    from pgproxy import backend

    return (backend.__file__ or "").endswith((".so", ".pyd"))
