"""Taking back a server whose client has gone, so that no one inherits its state.

Owns the rule for a server left behind by a client that disconnected (or was closed): reused
only if provably clean. Mid-query (replies in flight, an unsynced extended unit, COPY) or
mid-message (the client left part of a message unsent: the server would read whatever comes
next as the rest of it) it is closed; inside a transaction it gets a ROLLBACK, and in session
mode the pool's ``reset_query``, each as internal work whose failure closes it; then it is
released.

Rule: the server is either released or closed, exactly once, and never handed to another
client before its cleanup has succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from pgproxy.backend import ServerConnection
from pgproxy.pool.pool import Pool
from pgproxy.protocol.errors import PgError


def give_back(
    pool: Pool,
    server: ServerConnection,
    spawn: Callable[[Coroutine[Any, Any, Any]], None],
    mid_message: bool = False,
) -> None:
    """Take back ``server`` into ``pool``; the cleanup runs in a task ``spawn`` starts.
    ``mid_message``: the server has received only the start of the client's last message."""
    flow = server.flow
    if server.closed:
        return
    if mid_message:
        pool.close_for(server, "client left mid-message")
        return
    if flow.pending or flow.unsynced or flow.copy_in:
        # Mid-query: its results would go nowhere and its state is unknown.
        pool.close_for(server, "client left mid-query")
        return
    cleanup = []
    if flow.in_transaction:
        cleanup.append("ROLLBACK")
    if pool.mode == "session" and pool.settings.reset_query:
        cleanup.append(pool.settings.reset_query)
    if not cleanup:
        pool.release(server)
        return
    server.unlink()
    spawn(_clean_and_release(pool, server, cleanup))


async def _clean_and_release(pool: Pool, server: ServerConnection, statements: list[str]) -> None:
    try:
        for sql in statements:
            result = await server.run_internal(sql)
            if result.error is not None:
                raise result.error
    except (PgError, ConnectionError) as exc:
        pool.close_for(server, f"cleanup failed: {exc}")
        return
    pool.release(server)
