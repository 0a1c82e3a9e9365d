"""One client's LISTEN side: its listener, notifications held for it, and NOTIFY attribution.

Owns what a client that LISTENs or NOTIFYs needs beyond any other client, created on its first
LISTEN or NOTIFY (most clients never need it): the listener connection it subscribes through,
the notifications held while it is inside a transaction (bounded), and the PID mapping that
makes its own notifications carry its virtual PID until the fence after its NOTIFY completes.
Also the replies the proxy makes for LISTEN/UNLISTEN and ``pg_listening_channels()`` without a
server.

Rule: no I/O and no session. The channel sets live in the
:class:`~pgproxy.pubsub.listener.Listener` (keyed by the session); this object remembers which
listener that is and the client's channels in Postgres' order (set only where the listener's
set changes, by the session), and returns bytes or facts for the session to act on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgproxy import sql
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError

if TYPE_CHECKING:
    from pgproxy.pubsub.listener import Listener


class Subscriptions:
    __slots__ = (
        "channels",
        "fence_done",
        "held",
        "held_bytes",
        "listener",
        "may_have_notified",
        "pid_mapped",
    )

    def __init__(self) -> None:
        self.listener: Listener | None = None  # set on the first LISTEN
        # The committed channels, in the order Postgres lists them (pg_listening_channels():
        # LISTEN order); the listener holds the same names as a set.
        self.channels: list[str] = []
        self.held: list[bytes] = []  # notifications held until the transaction ends
        self.held_bytes = 0
        self.may_have_notified = False  # the transaction in flight may have sent NOTIFY
        self.fence_done = False  # the fence after it completed: let the ReadyForQuery pass
        # (listener, real backend PID) mapped to this client's virtual PID while it NOTIFYs.
        self.pid_mapped: tuple[Listener, int] | None = None

    def hold(self, data: bytes, limit: int) -> bool:
        """Hold notifications for the end of the transaction; False once more than ``limit``
        bytes are held (the caller drops them)."""
        self.held.append(data)
        self.held_bytes += len(data)
        return self.held_bytes <= limit

    def take_held(self) -> bytes:
        out = b"".join(self.held)
        self.held.clear()
        self.held_bytes = 0
        return out

    def drop_held(self) -> int:
        """Discard the held notifications (they will never be delivered): how many."""
        dropped = sum(notifications_in(data) for data in self.held)
        self.held.clear()
        self.held_bytes = 0
        return dropped

    def map_pid(self, listener: Listener, server_pid: int, vpid: int) -> None:
        listener.map_pid(server_pid, vpid)
        self.pid_mapped = (listener, server_pid)

    def unmap_pid(self, vpid: int) -> None:
        if self.pid_mapped is not None:
            listener, pid = self.pid_mapped
            listener.unmap_pid(pid, vpid)
            self.pid_mapped = None


def notifications_in(data: bytes) -> int:
    """How many NotificationResponses ``data`` (whole ones, as fan-out hands them) holds."""
    count = pos = 0
    while pos < len(data):
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        count += 1
    return count


def subscription_query(body: bytes) -> list[sql.Subscription] | None:
    """The statements of a Query made only of LISTEN/UNLISTEN (``body`` passed the
    ``precheck.might_matter`` pre-check), else None."""
    try:
        text = m.parse_query(body)
    except m.ProtocolError:
        return None  # let the server say what is wrong with it
    return sql.subscription_statements(text)


def truncation_notices(body: bytes, statements: list[sql.Subscription]) -> bytes:
    """The NOTICEs (42622) Postgres' scanner sends for identifiers longer than 63 bytes, for a
    Query of LISTEN/UNLISTEN answered without a server. Only a channel name of exactly 63
    bytes can have been cut, so the text is scanned only then."""
    if not any(
        st.channel is not None and len(st.channel.encode("utf-8")) == 63 for st in statements
    ):
        return b""
    notices = []
    for name, cut in sql.truncated_identifiers(m.parse_query(body)):
        fields = PgError(
            errors.NAME_TOO_LONG,
            f'identifier "{name}" will be truncated to "{cut}"',
            severity="NOTICE",
        ).fields()
        notices.append(m.error_response(fields, notice=True))
    return b"".join(notices)


def is_listening_channels_query(body: bytes) -> bool:
    """``SELECT pg_listening_channels()``, answered from the client's own channels: through a
    pool the server's answer would describe a random pooled server."""
    try:
        text = m.parse_query(body)
    except m.ProtocolError:
        return False
    return sql.is_listening_channels_query(text)


def listening_channels_reply(channels: list[str]) -> bytes:
    """What Postgres sends for ``SELECT pg_listening_channels()``, before its ReadyForQuery."""
    out = [m.row_description([("pg_listening_channels", m.TEXT_OID)])]
    out += [m.data_row([c]) for c in channels]
    out.append(m.command_complete(f"SELECT {len(channels)}"))
    return b"".join(out)


def subscription_tags(statements: list[sql.Subscription]) -> bytes:
    """The CommandCompletes Postgres sends for a Query of LISTEN/UNLISTEN statements."""
    return b"".join(
        m.command_complete("LISTEN" if isinstance(st, sql.Listen) else "UNLISTEN")
        for st in statements
    )
