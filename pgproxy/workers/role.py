"""What a worker process is: its ``WorkerRole`` on the command line, and its share of the sizes.

The supervisor starts each worker with ``WORKER_FLAG`` and a ``WorkerRole`` (``arg``); the
worker's CLI parses it back (``parse``) and runs ``per_worker`` of the configuration. Each
worker gets a share of every configured size: pool sizes are divided by N rounded down (at
least 1), ``min_pool_size`` rounded down, ``max_client_conn`` rounded up, so the totals stay
what the file says (unless a pool size is smaller than N).

Rule: this is the bottom of ``pgproxy.workers``: plain data and arithmetic, importing nothing
of pgproxy but ``pgproxy.config`` and nothing that runs an event loop, so that ``pgproxy.cli``
imports it at parse time and both sides of the command line (the supervisor that writes a
role, the worker that reads it) share one definition.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pgproxy.config import Config

__all__ = ["WORKER_FLAG", "WorkerRole", "per_worker"]

WORKER_FLAG = "--worker"  # internal: how the supervisor starts a worker


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What a worker process is told on its command line: ``INDEX,COUNT,FD,UNIXFD,DIR``."""

    index: int
    count: int
    channel_fd: int  # this worker's end of the socketpair shared with the supervisor
    peer_dir: Path  # private directory holding every worker's cancel socket
    # The listening unix socket the supervisor bound (-1: none). Unix sockets have no
    # SO_REUSEPORT: the workers share one, inherited, and the kernel hands each accept to one.
    unix_fd: int = -1

    def arg(self) -> str:
        return f"{self.index},{self.count},{self.channel_fd},{self.unix_fd},{self.peer_dir}"

    @classmethod
    def parse(cls, text: str) -> WorkerRole:
        try:
            index, count, fd, unix_fd, directory = text.split(",", 4)
            role = cls(int(index), int(count), int(fd), Path(directory), int(unix_fd))
        except ValueError:
            raise ValueError(f"bad {WORKER_FLAG} value {text!r}") from None
        if not 0 <= role.index < role.count:
            raise ValueError(f"bad {WORKER_FLAG} value {text!r}")
        return role


def per_worker(config: Config, count: int) -> Config:
    """The configuration one of ``count`` workers runs: its share of every size."""
    if count == 1:
        return config

    def share(size: int) -> int:
        return max(1, size // count)

    def share_opt(size: int | None) -> int | None:
        return None if size is None else share(size)

    def share_min(size: int | None) -> int | None:
        # Rounded down like the pool sizes, so min_pool_size <= pool size still holds.
        return None if size is None else size // count

    proxy = config.proxy
    return dataclasses.replace(
        config,
        proxy=dataclasses.replace(
            proxy,
            max_client_conn=-(-proxy.max_client_conn // count),
            default_pool_size=share(proxy.default_pool_size),
            min_pool_size=proxy.min_pool_size // count,
        ),
        databases={
            name: dataclasses.replace(
                db, pool_size=share_opt(db.pool_size), min_pool_size=share_min(db.min_pool_size)
            )
            for name, db in config.databases.items()
        },
        users={
            name: dataclasses.replace(user, pool_size=share_opt(user.pool_size))
            for name, user in config.users.items()
        },
    )
