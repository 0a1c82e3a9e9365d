"""Streaming standbys of throwaway clusters, for failover tests (stdlib only).

A standby is a :class:`~pgproxy.testing.cluster.PgCluster` whose data directory comes from
``pg_basebackup -R`` of a running primary (so it starts in recovery, streaming from it) instead
of ``initdb``. :func:`promote` makes it a primary (``pg_ctl promote``); :func:`rejoin` turns a
stopped old primary into a standby of the new one on its old port, the way an operator would
rebuild it after a failover.

Rule: everything goes through PgCluster's own way of running binaries (as the unprivileged
user when root), so a standby is cleaned up like any cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pgproxy.testing.cluster import PgCluster

_REPLICATION_HBA = "local replication all trust\nhost replication all 127.0.0.1/32 trust\n"


def allow_replication(primary: PgCluster) -> None:
    """Let a base backup and a standby connect for replication (trust, as the cluster's users)."""
    hba = primary.data_dir / "pg_hba.conf"
    text = hba.read_text()
    if "replication" not in text:
        hba.write_text(text + _REPLICATION_HBA)
        primary._run("pg_ctl", "reload", "-s", "-D", str(primary.data_dir))


def _base_backup(into: PgCluster, source: PgCluster) -> None:
    """Fill ``into``'s (absent) data directory with a standby copy of ``source``."""
    into._run(
        "pg_basebackup",
        "-D",
        str(into.data_dir),
        "-R",  # standby.signal, and primary_conninfo pointing at ``source``
        "-X",
        "stream",
        "-c",
        "fast",
        "--no-sync",
        "-h",
        source.host,
        "-p",
        str(source.port),
        "-U",
        source.superuser,
        timeout=120,
    )
    # It is a cluster already: no initdb, no roles to create (they came with the copy).
    into._initialized = True
    into._bootstrapped = True


def make_standby(primary: PgCluster, base_dir: Path | None = None) -> PgCluster:
    """A started standby of the running ``primary``, on a port of its own."""
    allow_replication(primary)
    standby = PgCluster(
        settings=primary.settings, base_dir=base_dir, bindir=primary.bindir, os_user=primary.os_user
    )
    _base_backup(standby, primary)
    standby.start()
    return standby


def promote(standby: PgCluster) -> None:
    """End recovery: the standby becomes a primary (returns once it accepts writes)."""
    standby._run("pg_ctl", "promote", "-w", "-s", "-D", str(standby.data_dir), timeout=90)


def is_in_recovery(cluster: PgCluster) -> bool:
    return cluster.psql("SELECT pg_is_in_recovery()") == "t"


def rejoin(old_primary: PgCluster, new_primary: PgCluster) -> None:
    """The stopped ``old_primary`` comes back, on its old port, as a standby of
    ``new_primary``: its data directory is rebuilt from a base backup of the new one."""
    old_primary.stop()
    allow_replication(new_primary)
    shutil.rmtree(old_primary.data_dir)
    _base_backup(old_primary, new_primary)
    old_primary.start()
