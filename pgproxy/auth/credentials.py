"""What the proxy logs in upstream with when it has no password: pass-through credentials.

Theory of operation. A user whose only secret is a verifier (``[users.X] password =
"SCRAM-SHA-256$..."`` or ``md5...``, or one found by ``auth_query``) can still reach a Postgres
that asks for a password, the way PgBouncer does it:

* **md5 hash**: an md5 response is ``md5(hash + salt)``, computable from the stored hash alone.
* **SCRAM verifier**: a client that logs in with SCRAM reveals its ClientKey (proof XOR
  signature); with that key and the verifier the proxy can answer the upstream's SCRAM challenge,
  as long as the upstream holds the same verifier (same salt and iterations).

:class:`PassThroughStore` keeps the latest credentials per (upstream host, port, upstream
user), learnt at each login that **proved** a password (md5 or SCRAM, never trust: a trust
login proved nothing, so it must not unlock what a stored hash or verifier can do); pools read
it whenever they open a server, so until a client of that user has logged in no server can be
opened for it (``min_pool_size`` warm-up waits for that). Two clusters with a role of the same
name keep separate entries. Entries live in memory only, are bounded, are dropped on reload,
and never appear in a log line or a repr.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pgproxy.auth.scram import ScramPassThrough, parse_verifier

_STORE_SIZE = 100_000  # users; an entry is ~200 bytes

# (upstream host, upstream port, upstream user)
StoreKey = tuple[str, int, str]


def is_md5_hash(secret: str) -> bool:
    """Postgres' test (``get_password_type``): "md5" and 32 lowercase hex digits."""
    return (
        len(secret) == 35
        and secret.startswith("md5")
        and all(c in "0123456789abcdef" for c in secret[3:])
    )


def is_verifier(secret: str) -> bool:
    """A stored hash rather than a password the proxy could send."""
    return secret.startswith("SCRAM-SHA-256$") or is_md5_hash(secret)


@dataclass(frozen=True, repr=False)
class Md5PassThrough:
    """An md5 hash (``md5`` + hex of md5(password + user)) used to answer an md5 challenge."""

    hash: str

    def __repr__(self) -> str:
        return "Md5PassThrough(***)"


# What ``authenticate_upstream`` can log in with.
UpstreamSecret = str | ScramPassThrough | Md5PassThrough


class PassThroughStore:
    """(host, port, upstream user) -> credentials learnt from that user's latest login that
    proved a password (bounded LRU)."""

    def __init__(self, size: int = _STORE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[StoreKey, UpstreamSecret] = OrderedDict()

    def learn(self, key: StoreKey, secret: str, client_key: bytes | None) -> None:
        """Remember what a login with ``secret`` (the user's stored secret) makes possible:
        a plain password (e.g. from a custom auth_query) is usable as it is.

        Only call this after the client proved it knows the password (md5 or SCRAM)."""
        entry: UpstreamSecret | None = secret
        if is_md5_hash(secret):
            entry = Md5PassThrough(secret)
        elif secret.startswith("SCRAM-SHA-256$"):
            verifier = parse_verifier(secret)
            entry = None
            if verifier is not None and client_key is not None:
                entry = ScramPassThrough(verifier, client_key)
        if entry is None:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def get(self, key: StoreKey) -> UpstreamSecret | None:
        return self._entries.get(key)

    def clear(self) -> None:
        """Forget everything (a reload: secrets or upstreams may have changed)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
