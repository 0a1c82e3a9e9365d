"""What a fault scenario gets (:class:`Env`) and gives back (:class:`Finding`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.throughput import REPO, pgbouncer_log, start_pgbouncer
from pgproxy.testing import servers
from pgproxy.testing.cluster import PgCluster
from pgproxy.testing.servers import free_port, stop_server

USER = "postgres"  # the cluster's superuser; both poolers let it in with trust


@dataclass
class Finding:
    """One datasheet row: what each pooler did (a sentence with the figures)."""

    title: str
    pgproxy: str
    pgbouncer: str  # what PgBouncer did in the same run, or why it could not be run there
    ok: bool  # pgproxy did what the scenario expects of it


@dataclass
class Target:
    """A running pooler: where to connect, and its admin console."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def dsn(self, dbname: str = "postgres", **params: Any) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={dbname}{extra}"

    def pools(self) -> list[dict[str, Any]]:
        """SHOW POOLS on the admin console (both answer it the same way)."""
        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True) as conn:
            cur = conn.execute("SHOW POOLS")
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def active_servers(self) -> int:
        """Servers the pooler holds as in use (stuck, once no client is connected)."""
        return sum(int(p["sv_active"]) for p in self.pools() if p["database"] != "pgbouncer")


@dataclass
class Env:
    cluster: PgCluster
    tmp: Path
    quick: bool = False
    _running: list[Target] = field(default_factory=list)

    def pgproxy(
        self, proxy: Mapping[str, Any] | None = None, databases: Mapping[str, str] | None = None
    ) -> Target:
        """pgproxy (``python -m pgproxy``) with these ``[proxy]`` settings; ``databases``: more
        routes, name -> URL (``*`` always goes to the cluster)."""
        port = free_port()
        settings = {"listen": f"127.0.0.1:{port}", "pool_mode": "transaction",
                    "log_level": "warning", "admin_users": [USER], **(proxy or {})}  # fmt: skip
        routes = {"*": f"postgresql://127.0.0.1:{self.cluster.port}", **(databases or {})}
        text = "[proxy]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
        text += "".join(f'\n[databases."{k}"]\nurl = "{v}"\n' for k, v in routes.items())
        config = self.tmp / f"pgproxy-{port}.toml"
        config.write_text(text)
        log = self.tmp / f"pgproxy-{port}.log"
        cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
        proc = servers.start_server("pgproxy", cmd, port, log, REPO)
        return self._started("pgproxy", port, proc, log)

    def pgbouncer(
        self, settings: Mapping[str, Any] | None = None, databases: Mapping[str, str] | None = None
    ) -> Target:
        """PgBouncer with these ``[pgbouncer]`` settings (trust, transaction mode unless
        given); ``databases``: more entries, name -> libpq connection string."""
        more = {"admin_users": USER, "max_client_conn": 10000, **(settings or {})}
        proc, port = start_pgbouncer(self.tmp, self.cluster.port, more, databases=databases)
        return self._started("pgbouncer", port, proc, pgbouncer_log(self.tmp, port))

    def _started(self, name: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> Target:
        target = Target(name, port, proc, log)
        self._running.append(target)
        return target

    def stop_all(self) -> None:
        while self._running:
            stop_server(self._running.pop().proc)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
