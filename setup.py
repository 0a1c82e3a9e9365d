"""Optional mypyc build of the hot modules; all metadata lives in pyproject.toml.

Without PGPROXY_COMPILE=1 this adds nothing: a pure-Python package, no compiler needed.
With it, COMPILED below are compiled to C extensions with mypyc (which ships with mypy):

    PGPROXY_COMPILE=1 pip install .      # pip's isolated build fetches mypy itself
    scripts/build-compiled               # in place, next to the .py files (editable installs)

``pgproxy.compiled()`` says at runtime which build is in use.
"""

import os
import sys
import tomllib

from setuptools import setup

# The modules compiled with PGPROXY_COMPILE=1 (the only list).
COMPILED = [
    "pgproxy/wire.py",
    "pgproxy/backend.py",
    "pgproxy/server_session.py",  # ServerConnection's base class: a native class needs native bases
    "pgproxy/client/stream.py",
    "pgproxy/client/units.py",
    "pgproxy/client/listening.py",
    "pgproxy/client/session.py",
    "pgproxy/client/statements.py",
    "pgproxy/client/pending.py",
    "pgproxy/client/subscriptions.py",
    "pgproxy/client/settings.py",
    "pgproxy/pool/pool.py",
    "pgproxy/pool/waiters.py",  # ServerRequest: delivered from inside a release
    "pgproxy/pool/stats.py",  # counters bumped per transaction: native attributes
    "pgproxy/protocol/flow.py",
    "pgproxy/protocol/framing.py",
    "pgproxy/protocol/messages.py",
    "pgproxy/prepared.py",
    "pgproxy/precheck.py",
    "pgproxy/pubsub/listener.py",  # fan-out: one call per listening client per notification
    # Not hot, but its _Lookup implements ServerLink, a trait once compiled, and interpreted
    # classes cannot inherit from compiled traits.
    "pgproxy/auth/query.py",
    # Not pgproxy/params.py: mypyc's classes take no weak references (ParamState needs them).
    # Not pgproxy/sql.py: pglast's Visitor finds visit_* methods with inspect.ismethod, which
    # is False for compiled methods, so _EffectsInside would silently see nothing (its hot
    # part, the pre-check, is precheck.py).
]


def _build_options() -> dict[str, object]:
    if os.environ.get("PGPROXY_COMPILE", "0") in ("", "0"):
        return {}
    try:
        from mypyc.build import mypycify
    except ImportError:
        if "egg_info" in sys.argv:  # pip's isolated build asking what it needs: mypy, and
            # the runtime dependencies, which mypyc type-checks the modules against.
            with open("pyproject.toml", "rb") as f:
                dependencies = tomllib.load(f)["project"]["dependencies"]
            return {"setup_requires": ["mypy>=1.10", *dependencies]}
        sys.exit("PGPROXY_COMPILE=1 needs mypy (it ships mypyc): pip install mypy")
    # group_name: the shared support library goes inside the package
    # (pgproxy/_compiled__mypyc.*.so), not top level, where an editable install misses it.
    return {"ext_modules": mypycify(COMPILED, opt_level="3", group_name="pgproxy._compiled")}


if __name__ == "__main__":  # also how pip's build backend runs it; importable for COMPILED
    setup(**_build_options())
