"""What a client session needs from the proxy that owns it, as protocols.

``pgproxy.app.Proxy`` satisfies them; the client package never imports app.py, so the session
sits below the proxy in the import graph (the circle app -> frontend -> app is gone).
:class:`ProxyServices` names no client type, so every module of the package can use it; the
calls that take the session itself are :class:`~pgproxy.client.session.SessionHost`'s.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from pgproxy.admin.commands import ConsoleHost
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError

if TYPE_CHECKING:
    import ssl

    from pgproxy.auth.credentials import PassThroughStore
    from pgproxy.auth.query import AuthQuery
    from pgproxy.config import Config
    from pgproxy.pool.pool import Pool
    from pgproxy.pubsub.listener import Listener, WorkerSiblings


class ProxyServices(ConsoleHost, Protocol):
    """The proxy's settings, pools, listeners and tasks, as a client session uses them (and
    what the admin console needs, for a console session)."""

    config: Config
    client_tls: ssl.SSLContext | None
    cert_binding: bytes | None
    auth_query: AuthQuery
    pass_through: PassThroughStore

    @property
    def client_count(self) -> int: ...
    @property
    def siblings(self) -> WorkerSiblings | None:
        """With workers: NOTIFY attribution across them (None: one process)."""
        ...

    def cancel(self, request: m.CancelRequest) -> None: ...
    def pool_for(self, database: str, user: str) -> Pool: ...
    def listener_for(self, pool: Pool) -> Listener: ...
    def existing_listener(self, pool: Pool) -> Listener | None: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def login_refusal(self, database: str) -> PgError | None: ...
