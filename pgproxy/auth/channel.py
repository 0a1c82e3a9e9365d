"""The one thing authentication needs from a connection: read a message, write bytes.

Keeping the auth code behind this protocol lets the same functions run over the proxy's real
connections (``pgproxy.wire``) and over in-memory pairs in the tests.
"""

from __future__ import annotations

from typing import Protocol


class MessageChannel(Protocol):
    """A connection in its handshake phase, as seen by the authentication exchanges."""

    async def read_message(self, max_length: int) -> tuple[int, bytes]:
        """The next regular message as (type byte, body).

        Raises ConnectionError on EOF and ``messages.ProtocolError`` when the length field
        (which counts itself) is below 4 or above ``max_length``.
        """
        ...

    def write(self, data: bytes) -> None:
        """Queue already framed bytes for sending."""
        ...
