"""What the operators' side reads of the proxy, as a protocol (``pgproxy.app.Proxy`` has it).

Rule: read-only views; nothing in ``pgproxy.ops`` changes the proxy through them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pgproxy.admin.snapshot import Snapshot
    from pgproxy.config import Config
    from pgproxy.pool.pool import Pool
    from pgproxy.pubsub.listener import Listener
    from pgproxy.pubsub.registry import ListenerKey


class OpsHost(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def pools(self) -> Mapping[tuple[str, str], Pool]:
        """Client pools by (database, user)."""
        ...

    @property
    def listeners(self) -> Mapping[ListenerKey, Listener]:
        """One listener per upstream (hosts, dbname)."""
        ...

    @property
    def draining(self) -> bool:
        """No new clients wanted: readiness fails."""
        ...

    @property
    def worker(self) -> tuple[int, int]:
        """(index, count) of this process among the workers ((0, 1) without workers)."""
        ...

    def snapshot(self) -> Snapshot:
        """What the admin console shows of this process."""
        ...

    def gather_snapshot(self) -> Awaitable[Snapshot]:
        """... of the whole proxy: every worker's that answers in time, merged."""
        ...
