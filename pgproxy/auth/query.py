"""``auth_query``: a user's stored secret looked up in Postgres, for users not in ``[users]``.

Theory of operation. :class:`AuthQuery` runs the configured query (by default a schema-qualified
``pg_catalog.pg_shadow`` lookup that leaves out expired ``VALID UNTIL`` roles) as ``auth_user``
over a small pool of its own per upstream database (made by the proxy, so it uses the same TLS,
authentication and timeouts as pooled servers, and never takes a slot from a client pool).

* **No injection, no search_path games** (CVE-2025-12819's class): the user name travels as a
  bind parameter of an unnamed extended-protocol statement; the connection is started with
  ``search_path=pg_catalog`` and no client startup parameter ever reaches it; the default query
  qualifies its operators too.
* **Where it runs is configuration, never client input**: one pool per configured route
  (host, port, database, auth_user). The database is ``auth_dbname`` if set, else the entry's
  upstream database (its URL's dbname, else its name); for the ``*`` entry without a dbname in
  its URL it is :data:`DEFAULT_AUTH_DBNAME` (``postgres``), never the database the client
  asked for: ``pg_shadow`` is cluster-wide, and a client must not create pools or upstream
  connections by naming databases, nor learn which exist before it has authenticated.
* **Same answer for every failure**: no row, a NULL or empty secret or an expired role all
  return None, which the caller turns into the same doomed exchange and 28P01 as a wrong password.
* **Cache**: found secrets are kept for ``auth_query_cache_ttl`` seconds, "no such user" for at
  most :data:`NEGATIVE_TTL` (a role created a moment ago can log in soon), errors not at all.
  Concurrent logins of one user share one lookup. A login that fails drops that user's entry,
  so a changed password is picked up at the next attempt. A reload empties the cache, and a
  lookup that started before it does not write its answer into the new one (generations).
* A lookup that cannot run (upstream down, permission denied on ``pg_shadow``) fails the login
  with 08006 and logs why; it says nothing about the user.

The query runs through :class:`_Lookup`, a :class:`~pgproxy.backend.ServerLink` that links to
a pooled server like a client would, sends Parse/Bind/Execute/Sync and reads the forwarded
replies; the server goes back to its pool at the ReadyForQuery.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr  # a marker for the optional mypyc build (setup.py)

from pgproxy.backend import ServerLink
from pgproxy.config import WILDCARD
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError, fatal
from pgproxy.protocol.framing import read_length
from pgproxy.wire import log

if TYPE_CHECKING:
    from pgproxy.backend import ServerConnection
    from pgproxy.config import Config, DatabaseConfig
    from pgproxy.pool.pool import Pool

NEGATIVE_TTL = 2.0  # seconds "no such user" is believed
DEFAULT_AUTH_DBNAME = "postgres"  # where a "*" entry without a URL dbname runs auth_query
_CACHE_SIZE = 10_000
_LOOKUP_TIMEOUT = 15.0  # seconds for one query once connected (statement_timeout is 10 s)
_REPLY_LIMIT = 64 * 1024  # a lookup's whole reply; a verifier is ~130 bytes
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

# (host, port, upstream dbname, auth_user)
RouteKey = tuple[str, int, str, str]
PoolFactory = Callable[["DatabaseConfig", str, str], "Pool"]


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled, and tests subclass it
class AuthQuery:
    """Lookups for one proxy: pools per auth route, a TTL cache, single-flight."""

    def __init__(self, make_pool: PoolFactory) -> None:
        self._make_pool = make_pool
        self._pools: dict[RouteKey, Pool] = {}
        self._cache: OrderedDict[tuple[RouteKey, str], tuple[float, str | None]] = OrderedDict()
        # (generation, route, user): a lookup from before a reload is never joined after it.
        self._inflight: dict[tuple[int, RouteKey, str], asyncio.Future[str | None]] = {}
        self._generation = 0  # bumped by reload(); answers from older generations go uncached
        self.queries = 0  # lookups actually sent (tests, stats)

    @staticmethod
    def auth_user(config: Config, db: DatabaseConfig) -> str:
        """The database's auth_user, else the proxy's ("" = no lookups)."""
        return db.auth_user if db.auth_user is not None else config.proxy.auth_user

    def _route(self, config: Config, db: DatabaseConfig) -> RouteKey:
        """Only configuration decides where the query runs (see the module docstring)."""
        dbname = config.proxy.auth_dbname or db.dbname
        if not dbname:
            dbname = DEFAULT_AUTH_DBNAME if db.name == WILDCARD else db.name
        return (db.host, db.port, dbname, self.auth_user(config, db))

    async def lookup(self, config: Config, db: DatabaseConfig, user: str) -> str | None:
        """``user``'s stored secret, or None when the query returns nothing usable."""
        route = self._route(config, db)
        key = (route, user)
        generation = self._generation
        flight = (generation, route, user)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[key]
        fut = self._inflight.get(flight)
        if fut is None:
            fut = asyncio.ensure_future(self._query(config, db, route, user))
            self._inflight[flight] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(flight, None))
        secret = await asyncio.shield(fut)  # a client giving up must not cancel the others
        if generation != self._generation:
            return secret  # a reload came in meanwhile: this answer is for this login only
        ttl = config.proxy.auth_query_cache_ttl
        if secret is None:
            ttl = min(ttl, NEGATIVE_TTL)
        if ttl > 0 and not (key in self._cache and self._cache[key][0] > now):
            self._cache[key] = (time.monotonic() + ttl, secret)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return secret

    def forget(self, config: Config, db: DatabaseConfig, user: str) -> None:
        """Drop a cached answer (its login failed: the password may have changed)."""
        self._cache.pop((self._route(config, db), user), None)

    async def _query(
        self, config: Config, db: DatabaseConfig, route: RouteKey, user: str
    ) -> str | None:
        pool = self._pools.get(route)
        if pool is None or pool.closing:
            pool = self._pools[route] = self._make_pool(db, route[2], route[3])
        self.queries += 1
        try:
            server = await pool.acquire(pool.settings.connect_timeout)
            try:
                async with asyncio.timeout(_LOOKUP_TIMEOUT):
                    rows = await _Lookup(server).run(config.proxy.auth_query, user)
            except TimeoutError:
                raise PgError(errors.QUERY_CANCELED, "auth_query timed out") from None
        except PgError as exc:
            log.warning(
                "auth_query as %r in database %r failed: %s", route[3], route[2], exc.message
            )
            raise fatal(
                errors.CONNECTION_FAILURE,
                "pgproxy could not look up the user's credentials",
                hint="the proxy's log says why (auth_query / auth_user settings)",
            ) from None
        if len(rows) != 1 or len(rows[0]) < 2 or rows[0][1] is None:
            if len(rows) > 1:
                log.warning("auth_query returned %d rows for one user; refusing", len(rows))
            return None
        secret = rows[0][1]
        if not secret.strip():
            return None  # an empty password is no password (Postgres refuses one too)
        return secret

    def reap(self, now: float) -> None:
        """Close idle lookup connections past server_idle_timeout / server_lifetime."""
        for pool in self._pools.values():
            pool.reap(now)

    def reload(self) -> None:
        """New settings: forget answers and retire pools (idle servers close now). Lookups
        still running finish for their own logins but cache nothing."""
        self._generation += 1
        self._cache.clear()
        self._inflight.clear()
        for pool in self._pools.values():
            pool.retire()
        self._pools.clear()

    async def close(self) -> None:
        self._cache.clear()
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()


class _Lookup(ServerLink):
    """One auth_query round trip on a linked server; rows are the text columns."""

    def __init__(self, server: ServerConnection) -> None:
        self._server = server
        self._buf = bytearray()
        self._rows: list[list[str | None]] = []
        self._error: PgError | None = None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self, sql: str, user: str) -> list[list[str | None]]:
        server = self._server
        server.link(self)
        out = [
            m.parse("", sql),
            m.bind("", "", [user.encode("utf-8", "surrogateescape")]),
            m.execute("", 2),  # one row is the answer; two is a broken query
            m.SYNC_MESSAGE,
        ]
        for msg in out:
            server.flow.client_message(msg[0])
        server.write(b"".join(out))
        try:
            await self._done
        except BaseException:
            # Cancelled or lost mid-reply: the server's state is unknown, never reuse it.
            if server.client is self:
                server.pool.close_server(server)
            raise
        if self._error is not None:
            raise self._error
        return self._rows

    # ServerLink
    def server_output(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > _REPLY_LIMIT:
            self._finish(PgError(errors.PROTOCOL_VIOLATION, "auth_query reply too large"))
            self._server.pool.close_server(self._server)
            return
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 5:
            end = pos + 1 + read_length(buf, pos + 1)
            if end > len(buf):
                break
            self._message(buf[pos], bytes(buf[pos + 5 : end]))
            pos = end
        del buf[:pos]

    def _message(self, type_: int, body: bytes) -> None:
        try:
            if type_ == m.DATA_ROW:
                self._rows.append(_parse_data_row(body))
            elif type_ == m.ERROR_RESPONSE and self._error is None:
                self._error = PgError.from_fields(m.parse_error_fields(body))
            elif type_ == m.READY_FOR_QUERY:
                self._finish(None)
        except (m.ProtocolError, struct.error, UnicodeDecodeError) as exc:
            self._error = PgError(errors.PROTOCOL_VIOLATION, f"malformed auth_query reply: {exc}")

    def _finish(self, error: PgError | None) -> None:
        if error is not None and self._error is None:
            self._error = error
        if not self._done.done():
            self._done.set_result(None)

    def server_parameter(self, name: str, value: str) -> None:
        pass

    def server_released(self) -> bool:
        return True

    def server_lost(self, error: PgError) -> None:
        self._finish(error)


def _parse_data_row(body: bytes) -> list[str | None]:
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    row: list[str | None] = []
    for _ in range(count):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            row.append(None)
            continue
        if pos + length > len(body):
            raise m.ProtocolError("DataRow value beyond the message")
        row.append(body[pos : pos + length].decode("utf-8"))
        pos += length
    return row
