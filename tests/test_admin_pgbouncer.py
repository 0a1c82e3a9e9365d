"""The console's SHOW headers beside the real thing.

pgproxy must answer every SHOW that PgBouncer has with PgBouncer 1.26's columns exactly (names,
order, type OIDs; OPS-CONVENTIONS.md and PgBouncer's admin.c/stats.c). The PgBouncer installed
here is older (1.18): the same commands are run on it, and where its header differs from
1.26's the difference must be exactly the documented additions and renames below, so this test
also checks the list of 1.26 columns against a PgBouncer that really runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.throughput import PGBOUNCER, start_pgbouncer, stop_server
from pgproxy.testing.cluster import PgCluster
from tests.conftest import MakeProxy

TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700
_TYPES = {"s": TEXT, "i": INT4, "q": INT8, "N": NUMERIC}


def _header(spec: str) -> list[tuple[str, int]]:
    """PgBouncer's way of writing a header: ``name:type`` with its type letters."""
    return [(name, _TYPES[t]) for name, t in (item.split(":") for item in spec.split())]


def _numeric(names: str) -> str:
    return " ".join(f"{name}:N" for name in names.split())


_STATS_FIELDS = (
    "server_assignment_count xact_count query_count bytes_received bytes_sent xact_time "
    "query_time wait_time client_parse_count server_parse_count bind_count client_login_count"
)
_SOCKETS = (
    "type:s user:s database:s replication:s state:s addr:s port:i local_addr:s local_port:i "
    "connect_time:s request_time:s wait:i wait_us:i close_needed:i ptr:s link:s remote_pid:i "
    "tls:s application_name:s prepared_statements:i id:i"
)
# PgBouncer 1.26, written out independently of pgproxy's views.py.
V1_26 = {
    "POOLS": _header(
        "database:s user:s cl_active:i cl_waiting:i cl_active_cancel_req:i "
        "cl_waiting_cancel_req:i sv_active:i sv_active_cancel:i sv_being_canceled:i sv_idle:i "
        "sv_used:i sv_tested:i sv_login:i maxwait:i maxwait_us:i pool_mode:s "
        "load_balance_hosts:s"
    ),
    "STATS": _header(
        "database:s "
        + _numeric(" ".join(f"total_{f}" for f in _STATS_FIELDS.split()))
        .replace("total_bytes_received", "total_received")
        .replace("total_bytes_sent", "total_sent")
        + " "
        + _numeric(" ".join(f"avg_{f}" for f in _STATS_FIELDS.split()))
        .replace("avg_bytes_received", "avg_recv")
        .replace("avg_bytes_sent", "avg_sent")
    ),
    "STATS_TOTALS": _header("database:s " + _numeric(_STATS_FIELDS)),
    "STATS_AVERAGES": _header(
        "database:s "
        + _numeric(
            "server_assignment_count xact_count query_count bytes_received bytes_sent "
            "xact_time query_time wait_time avg_client_parse_count avg_server_parse_count "
            "avg_bind_count avg_client_login_count"
        )
    ),
    "TOTALS": _header("name:s value:N"),
    "CLIENTS": _header(_SOCKETS),
    "SERVERS": _header(_SOCKETS),
    "DATABASES": _header(
        "name:s host:s port:i database:s force_user:s pool_size:i min_pool_size:i "
        "reserve_pool_size:i server_lifetime:i pool_mode:s load_balance_hosts:s "
        "max_connections:i current_connections:i max_client_connections:i "
        "current_client_connections:i paused:i disabled:i"
    ),
    "USERS": _header(
        "name:s pool_size:s reserve_pool_size:s pool_mode:s max_user_connections:i "
        "current_connections:i max_user_client_connections:i current_client_connections:i"
    ),
    "LISTS": _header("list:s items:i"),
    "CONFIG": _header("key:s value:s default:s changeable:s"),
    "VERSION": _header("version:s"),
    "STATE": _header("key:s value:s"),
}

# What 1.26 added (the columns' names) and renamed (1.26 name -> 1.18 name) since 1.18;
# None: a command 1.18 does not have.
_PARSE_COUNTS = "client_parse_count server_parse_count bind_count client_login_count"
_STATS_126 = f"server_assignment_count {_PARSE_COUNTS}".split()
SINCE_1_18: dict[str, tuple[str, dict[str, str]] | None] = {
    "POOLS": ("load_balance_hosts", {}),
    "STATS": (" ".join(f"{p}{f}" for p in ("total_", "avg_") for f in _STATS_126), {}),
    "STATS_TOTALS": (" ".join(_STATS_126), {}),
    "STATS_AVERAGES": (
        " ".join(["server_assignment_count", *(f"avg_{f}" for f in _PARSE_COUNTS.split())]),
        {},
    ),
    "TOTALS": ("", {}),
    "CLIENTS": ("replication prepared_statements id", {}),
    "SERVERS": ("replication prepared_statements id", {}),
    "DATABASES": (
        "server_lifetime load_balance_hosts max_client_connections current_client_connections",
        {"reserve_pool_size": "reserve_pool"},
    ),
    "USERS": (
        "pool_size reserve_pool_size max_user_connections current_connections "
        "max_user_client_connections current_client_connections",
        {},
    ),
    "LISTS": ("", {}),
    "CONFIG": ("", {}),
    "VERSION": ("", {}),
    "STATE": None,
}


def _as_1_18(command: str) -> list[tuple[str, int]] | None:
    change = SINCE_1_18[command]
    if change is None:
        return None
    added, renamed = change
    gone = set(added.split())
    return [(renamed.get(name, name), oid) for name, oid in V1_26[command] if name not in gone]


def _headers(dsn: str) -> dict[str, list[tuple[str, int]] | None]:
    out: dict[str, list[tuple[str, int]] | None] = {}
    with psycopg.connect(dsn, autocommit=True) as con:
        for command in V1_26:
            try:
                cur = con.execute(f"SHOW {command}")
            except psycopg.Error:
                out[command] = None
                continue
            out[command] = [(d.name, d.type_code) for d in cur.description or ()]
    return out


@pytest.fixture
def pgbouncer(pg: PgCluster) -> Iterator[int]:
    if not Path(PGBOUNCER).exists():
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    tmp = Path(tempfile.mkdtemp(prefix="pgx-bouncer-"))
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")  # it runs as postgres and writes here
    try:
        proc, port = start_pgbouncer(
            tmp, pg.port, {"default_pool_size": 2, "max_client_conn": 20, "admin_users": "postgres"}
        )
        try:
            yield port
        finally:
            stop_server(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_every_shared_show_has_pgbouncer_1_26s_columns(
    make_proxy: MakeProxy, pgbouncer: int
) -> None:
    proxy = make_proxy(proxy={"admin_users": ["postgres"]})
    ours = _headers(proxy.dsn(dbname="pgbouncer"))
    assert ours == V1_26

    version = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True).stdout
    if not re.match(r"PgBouncer 1\.18\.", version):
        pytest.skip(f"the documented differences are 1.18's; this is {version.splitlines()[0]}")
    theirs = _headers(f"postgresql://postgres@127.0.0.1:{pgbouncer}/pgbouncer")
    assert theirs == {command: _as_1_18(command) for command in V1_26}
