"""Client loops that keep a pooler busy while a scenario breaks something, and remember what
each attempt got and when (the datasheet needs times; tests/support/load.py only counts); and
what listeners were told when the proxy's listener connection was lost."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from typing import Any

import psycopg


def kind(exc: BaseException) -> str:
    """What an error says, short: its SQLSTATE and message (libpq's connection errors have
    no SQLSTATE field: the FATAL's text, then)."""
    sqlstate = getattr(exc, "sqlstate", None)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0].rsplit("failed: ", 1)[-1] if lines else type(exc).__name__
    found = re.search(r"(?:FATAL|ERROR):\s+(.*)", str(exc))
    if found:
        text = found[1]
    text = text.strip()[:80]
    return f"{sqlstate} {text}" if sqlstate else text


class Loops:
    """``count`` threads running ``select 1`` on ``dsn``, reconnecting after any error."""

    def __init__(self, dsn: str, count: int = 4) -> None:
        self.dsn = dsn
        self.events: list[tuple[float, str]] = []  # (monotonic time, "ok" or the error's kind)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]

    def __enter__(self) -> Loops:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(
                        self.dsn, autocommit=True, connect_timeout=10, prepare_threshold=None
                    )
                conn.execute("select 1").fetchone()
                self.events.append((time.monotonic(), "ok"))
            except psycopg.Error as exc:
                self.events.append((time.monotonic(), kind(exc)))
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.05)  # as an application's retry would, not a spin
        if conn is not None:
            conn.close()

    def first_ok_after(self, t: float) -> float | None:
        return next((when for when, what in list(self.events) if when >= t and what == "ok"), None)

    def errors(self, since: float) -> Counter[str]:
        return Counter(what for when, what in list(self.events) if when >= since and what != "ok")


def describe(errors: Counter[str]) -> str:
    if not errors:
        return "no error"
    top = "; ".join(f"{n} x `{what}`" for what, n in errors.most_common(3))
    more = len(errors) - 3
    return top + (f"; {more} other kinds" if more > 0 else "")


def listening(dsn: str, count: int, channel: str) -> list[psycopg.Connection[tuple[Any, ...]]]:
    """``count`` clients of ``dsn`` that LISTEN on ``channel``."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(count)]
    for conn in conns:
        conn.execute(f"LISTEN {channel}")
    return conns


def told_of_loss(
    listeners: list[psycopg.Connection[tuple[Any, ...]]], within: float = 10.0
) -> tuple[int, int]:
    """How many listeners were closed with an error naming the listener, and how many are
    still open as if nothing happened ``within`` seconds of the call (listener_loss =
    "disconnect": none may be; the proxy learns of the loss a moment after the kill); closes
    all."""
    deadline = time.monotonic() + within
    told = silent = 0
    for conn in listeners:
        try:
            while True:
                conn.execute("select 1")
                if time.monotonic() >= deadline:
                    silent += 1
                    break
                time.sleep(0.05)
        except psycopg.OperationalError as exc:
            told += "listener" in str(exc)
        finally:
            conn.close()
    return told, silent


def hears_again(dsn: str, direct_dsn: str, channel: str) -> float | None:
    """Seconds until a new LISTEN through ``dsn`` heard a NOTIFY sent directly (None: not
    within 10 s)."""
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as again:
        again.execute(f"LISTEN {channel}")
        with psycopg.connect(direct_dsn, autocommit=True) as direct:
            direct.execute(f"NOTIFY {channel}, 'back'")
        heard = [n.payload for n in again.notifies(timeout=10, stop_after=1)] == ["back"]
    return time.monotonic() - started if heard else None
