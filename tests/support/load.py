"""Client loops that keep a proxy busy while a test breaks something (tests/test_faults_*.py).

Each loop runs ``select 1`` in autocommit, reconnecting when its connection is lost, counts
what succeeded, and keeps every error that is not the loss of a connection or of the statement
that was running when a server died."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg


def select_one(conn: psycopg.Connection) -> None:
    assert conn.execute("select 1").fetchone() == (1,)


class ClientLoops:
    """``count`` threads each running ``work`` (one unit, on an autocommit connection) again
    and again; ``select_one`` unless told otherwise."""

    def __init__(
        self, dsn: str, count: int = 4, work: Callable[[psycopg.Connection], None] = select_one
    ) -> None:
        self.dsn = dsn
        self.work = work
        self.done = 0
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]

    def __enter__(self) -> ClientLoops:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                self.work(conn)
                self.done += 1
            except psycopg.OperationalError:
                conn = None  # its server died under the statement, or Postgres was down
            except psycopg.Error as exc:
                self.unexpected.append(repr(exc))
                conn = None
        if conn is not None:
            conn.close()

    def served(self, more: int, timeout: float = 20.0, what: str = "") -> None:
        """Wait until ``more`` statements more have succeeded (the proxy serves, no hang)."""
        target = self.done + more
        _until(lambda: self.done >= target, timeout, f"not served {what}".strip())


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll state that offers no event to wait on (other threads' progress)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def no_server_stays_taken(proxy: object, timeout: float = 10.0) -> None:
    """Once its clients are gone, every pooled server of ``proxy`` (a ProxyThread) is back."""

    def taken() -> int:
        return int(
            proxy.call(  # type: ignore[attr-defined]
                lambda p: sum(len(pool.active) for pool in p.pools.values())
            )
        )

    _until(lambda: taken() == 0, timeout, "a pooled server stayed in use")


def told_and_closed(conn: psycopg.Connection, why: str) -> None:
    """``conn`` (a listener) was closed with an error saying ``why``, not left in silence."""
    try:
        conn.execute("select 1")
        raise AssertionError(f"the client was not told: {why}")
    except psycopg.OperationalError as exc:
        assert why in str(exc), exc
    finally:
        conn.close()


def hears_after_listen(proxy_dsn: str, direct_dsn: str, channel: str) -> None:
    """A new LISTEN through the proxy hears a NOTIFY sent directly: the listener is back."""
    with psycopg.connect(proxy_dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {channel}")
        with psycopg.connect(direct_dsn, autocommit=True) as direct:
            direct.execute(f"NOTIFY {channel}, 'heard'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [n.payload for n in got] == ["heard"]


def servers_in_use(console_dsn: str) -> int:
    """Pooled servers in use (``sv_active`` of every pool), asked of a proxy's console."""
    with psycopg.connect(console_dsn, autocommit=True) as console:
        cur = console.execute("SHOW POOLS")
        names = [d.name for d in cur.description or ()]
        return sum(int(dict(zip(names, row, strict=True))["sv_active"]) for row in cur.fetchall())
