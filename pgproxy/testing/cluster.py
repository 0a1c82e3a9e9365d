"""Throwaway PostgreSQL clusters for tests and benchmarks (stdlib only).

A :class:`PgCluster` runs ``initdb`` into a fresh temporary directory and starts a
private ``postgres`` on a free port of 127.0.0.1 (never the system server on 5432).
The cluster is tuned for speed, not durability (fsync=off, ...).

When the current process runs as root, every PostgreSQL binary is run through
``runuser -u postgres --`` (PostgreSQL refuses to run as root; ``os_user`` names another
unprivileged OS user) and the temporary directory is handed over to that user.

Roles created on first start (see the module constants)::

    postgres   superuser (bootstrap user), trust over TCP and the unix socket
    md5user    password 'md5pass', stored as md5, pg_hba method md5
    scramuser  password 'scrampass', stored as SCRAM, pg_hba method scram-sha-256
    pwuser     password 'pwpass', pg_hba method password (cleartext)
    app        superuser without a password (trust), owner of database ``app``

Typical use::

    with PgCluster(settings={"max_connections": "50"}) as pg:
        conn = psycopg.connect(pg.dsn())
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = [
    "APP_DB",
    "APP_USER",
    "MD5_PASSWORD",
    "MD5_USER",
    "PASSWORDS",
    "PW_PASSWORD",
    "PW_USER",
    "SCRAM_PASSWORD",
    "SCRAM_USER",
    "SUPERUSER",
    "PgCluster",
    "PgClusterError",
    "find_bindir",
]

SUPERUSER = "postgres"
MD5_USER = "md5user"
MD5_PASSWORD = "md5pass"
SCRAM_USER = "scramuser"
SCRAM_PASSWORD = "scrampass"
PW_USER = "pwuser"
PW_PASSWORD = "pwpass"
APP_USER = "app"
APP_DB = "app"

#: user -> password for every role that needs one.
PASSWORDS: Mapping[str, str] = {
    MD5_USER: MD5_PASSWORD,
    SCRAM_USER: SCRAM_PASSWORD,
    PW_USER: PW_PASSWORD,
}

_OS_USER_WHEN_ROOT = "postgres"
_START_ATTEMPTS = 5
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 60

_PG_HBA = f"""\
# written by pgproxy.testing.cluster
local all all trust
host all {MD5_USER} 127.0.0.1/32 md5
host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256
host all {PW_USER} 127.0.0.1/32 password
host all all 127.0.0.1/32 trust
"""

_BOOTSTRAP_SQL = f"""\
SET password_encryption = 'md5';
CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';
SET password_encryption = 'scram-sha-256';
CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}';
CREATE ROLE {PW_USER} LOGIN PASSWORD '{PW_PASSWORD}';
CREATE ROLE {APP_USER} LOGIN SUPERUSER;
CREATE DATABASE {APP_DB} OWNER {APP_USER};
"""

_BIND_FAILURE = re.compile(
    r"could not bind|address already in use|could not create any TCP/IP sockets"
    r"|could not create listen socket|lock file .* already exists",
    re.IGNORECASE,
)


class PgClusterError(RuntimeError):
    """A PostgreSQL binary failed; the message includes its output and the log tail."""


def _version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name  # /usr/lib/postgresql/<ver>/bin
    return tuple(int(p) for p in re.findall(r"\d+", name)) or (0,)


def find_bindir() -> Path:
    """Locate the PostgreSQL server binaries.

    ``$PG_BIN`` if set, else ``pg_config --bindir`` (if it holds ``initdb``), else the
    newest ``/usr/lib/postgresql/*/bin``, else the directory of ``initdb`` on ``$PATH``.
    """
    env = os.environ.get("PG_BIN")
    if env:
        path = Path(env)
        if not (path / "initdb").exists():
            raise PgClusterError(f"PG_BIN={env!r} does not contain initdb")
        return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and (Path(out) / "initdb").exists():
                return Path(out)
    candidates = [c for c in glob.glob("/usr/lib/postgresql/*/bin") if Path(c, "initdb").exists()]
    if candidates:
        return Path(max(candidates, key=_version_key))
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PgClusterError("cannot find PostgreSQL binaries (set PG_BIN to the bindir)")


def _pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conf_value(value: str | int | float | bool) -> str:
    text = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    """The current environment minus libpq/PG variables that could redirect our binaries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    return env


class PgCluster:
    """A private, throwaway PostgreSQL cluster listening on 127.0.0.1:<free port>."""

    host: str = "127.0.0.1"

    def __init__(
        self,
        *,
        settings: Mapping[str, str | int | float | bool] | None = None,
        base_dir: Path | None = None,
        bindir: Path | None = None,
        os_user: str = _OS_USER_WHEN_ROOT,
    ) -> None:
        self.bindir: Path = bindir if bindir is not None else find_bindir()
        self.os_user = os_user  # who runs PostgreSQL when we are root
        self.superuser: str = SUPERUSER
        self.settings: dict[str, str | int | float | bool] = {"max_connections": "100"}
        self.settings.update(settings or {})
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pwd.getpwnam(os_user)
            except KeyError:
                raise PgClusterError(
                    f"running as root needs an OS user {os_user!r} to run PostgreSQL"
                ) from None
        self.root_dir = Path(tempfile.mkdtemp(prefix="pgproxy-pg-", dir=base_dir)).resolve()
        self.data_dir: Path = self.root_dir / "data"
        self.log_file: Path = self.root_dir / "postgres.log"
        sock = self.root_dir / "sock"
        # sun_path is limited to ~107 bytes; keep the socket path short.
        self._extra_dir: Path | None = None
        if len(str(sock)) + len("/.s.PGSQL.65535.lock") > 100:
            self._extra_dir = Path(tempfile.mkdtemp(prefix="pgs-", dir="/tmp"))
            sock = self._extra_dir
        self.socket_dir: Path = sock
        self.socket_dir.mkdir(exist_ok=True)
        self.port: int = 0  # chosen on first start(), then kept for the cluster's life
        self._initialized = False
        self._bootstrapped = False
        self._destroyed = False
        self._atexit_registered = False
        if self._as_root:
            group = pwd.getpwnam(os_user).pw_gid
            for d in (self.root_dir, self.socket_dir):
                shutil.chown(d, os_user, group)

    # ------------------------------------------------------------------ helpers

    def __repr__(self) -> str:
        return f"<PgCluster {self.host}:{self.port} data={self.data_dir}>"

    def _cmd(self, binary: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / binary), *args]
        if self._as_root:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        return cmd

    def _run(
        self,
        binary: str,
        *args: str,
        input: str | None = None,
        timeout: float = 120,
        check: bool = True,
        log_tail: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        cmd = self._cmd(binary, *args)
        try:
            proc = subprocess.run(
                cmd,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.root_dir,
                env=_clean_env(),
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise PgClusterError(self._describe(cmd, None, "", "timed out", log_tail)) from e
        if check and proc.returncode != 0:
            raise PgClusterError(
                self._describe(cmd, proc.returncode, proc.stdout, proc.stderr, log_tail)
            )
        return proc

    def _describe(
        self, cmd: Sequence[str], rc: int | None, stdout: str, stderr: str, log_tail: bool
    ) -> str:
        parts = [f"command failed (rc={rc}): {' '.join(cmd)}"]
        if stdout.strip():
            parts.append("stdout:\n" + stdout.rstrip())
        if stderr.strip():
            parts.append("stderr:\n" + stderr.rstrip())
        if log_tail:
            parts.append(f"server log tail ({self.log_file}):\n" + self.log_tail(40))
        return "\n".join(parts)

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server log (empty string if there is none)."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ lifecycle

    def _initdb(self) -> None:
        if self._initialized:
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-E",
                "UTF8",
                "--locale=C",
                "-U",
                self.superuser,
                "-A",
                "trust",
                "--no-sync",
            )
            (self.data_dir / "pg_hba.conf").write_text(_PG_HBA)
            with (self.data_dir / "postgresql.conf").open("a") as f:
                f.write("\n# pgproxy.testing.cluster\ninclude 'pgproxy_test.conf'\n")
        self._initialized = True

    def _write_settings(self) -> None:
        conf: dict[str, str | int | float | bool] = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        conf.update(self.settings)
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in conf.items())
        path = self.data_dir / "pgproxy_test.conf"
        path.write_text(text)
        if self._as_root:
            shutil.chown(path, self.os_user, pwd.getpwnam(self.os_user).pw_gid)
        path.chmod(0o600)

    def is_running(self) -> bool:
        """Whether the postmaster of this cluster is up (``pg_ctl status``)."""
        if not self._initialized or self._destroyed:
            return False
        proc = self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False, timeout=30)
        return proc.returncode == 0

    def start(self) -> None:
        """initdb (first time only) and ``pg_ctl start -w``; a no-op if already running.

        The first start picks a free port (retrying if it gets taken in the meantime);
        later starts (e.g. :meth:`restart`) reuse the same port.
        """
        if self._destroyed:
            raise PgClusterError("cluster was destroyed")
        self._initdb()
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True
        if self.is_running():
            return
        fixed_port = self.port != 0
        attempts = 1 if fixed_port else _START_ATTEMPTS
        for attempt in range(attempts):
            if not fixed_port:
                self.port = _pick_free_port()
            self._write_settings()
            offset = self._log_size()
            proc = self._run(
                "pg_ctl",
                "start",
                "-w",
                "-s",
                "-t",
                str(_START_TIMEOUT_S),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                check=False,
                timeout=_START_TIMEOUT_S + 30,
            )
            if proc.returncode == 0:
                break
            new_log = self._log_since(offset)
            if not fixed_port and attempt + 1 < attempts and _BIND_FAILURE.search(new_log):
                continue  # port got taken between picking and binding: try another one
            raise PgClusterError(
                self._describe(
                    self._cmd("pg_ctl", "start"),
                    proc.returncode,
                    proc.stdout,
                    proc.stderr,
                    log_tail=True,
                )
            )
        if not self._bootstrapped:
            self._bootstrap()

    def _bootstrap(self) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{MD5_USER}'")
        if not exists.strip():
            self.psql(_BOOTSTRAP_SQL)
        self._bootstrapped = True

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (smart|fast|immediate); a no-op if not running."""
        if not self.is_running():
            return
        self._run(
            "pg_ctl",
            "stop",
            "-w",
            "-s",
            "-m",
            mode,
            "-t",
            str(_STOP_TIMEOUT_S),
            "-D",
            str(self.data_dir),
            timeout=_STOP_TIMEOUT_S + 30,
            log_tail=True,
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port and data directory."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server (fast, falling back to immediate) and delete all its files."""
        if self._destroyed:
            return
        try:
            try:
                self.stop("fast")
            except PgClusterError:
                self.stop("immediate")
        finally:
            self._destroyed = True
            if self._atexit_registered:
                atexit.unregister(self._atexit)
                self._atexit_registered = False
            for d in (self.root_dir, self._extra_dir):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.destroy()

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # ------------------------------------------------------------------ access

    def dsn(
        self, user: str | None = None, dbname: str = "postgres", password: str | None = None
    ) -> str:
        """libpq URI ``postgresql://user[:password]@127.0.0.1:port/dbname`` (TCP)."""
        if not self.port:
            raise PgClusterError("cluster not started yet")
        userinfo = quote(user if user is not None else self.superuser, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser over the unix socket.

        Uses ``-X -A -t -q -v ON_ERROR_STOP=1`` and feeds the SQL on stdin, so several
        statements (including CREATE DATABASE) run one by one, each in its own implicit
        transaction. Returns stdout without the final newline; raises
        :class:`PgClusterError` on any error.
        """
        proc = self._run(
            "psql",
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            self.superuser,
            "-d",
            dbname,
            "-f",
            "-",
            input=sql,
        )
        return proc.stdout.removesuffix("\n")
