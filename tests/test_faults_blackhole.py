"""A black-holed upstream (it accepts TCP and never answers): no client waits for more than
the connect attempt that was already failing when it arrived (issue 16's first fault)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import MakeProxy

CONNECT_TIMEOUT = 2.0


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose kernel completes TCP handshakes that nobody ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accept()ed: connections sit in the backlog, silent
        yield int(sock.getsockname()[1])


def test_logins_arriving_during_a_failing_connect_share_its_outcome(
    make_proxy: MakeProxy, black_hole: int
) -> None:
    proxy = make_proxy(
        proxy={"server_connect_timeout": CONNECT_TIMEOUT, "client_login_timeout": 60},
        databases={"hole": {"url": f"postgresql://127.0.0.1:{black_hole}/postgres"}},
    )
    waits: list[float] = []
    errors: list[str] = []

    def client() -> None:
        started = time.monotonic()
        try:
            psycopg.connect(proxy.dsn(dbname="hole"), connect_timeout=30).close()
            errors.append("connected to a black hole")
        except psycopg.OperationalError as exc:
            errors.append(str(exc))
        waits.append(time.monotonic() - started)

    threads = []
    for _ in range(3):  # arriving at +0, +0.5 and +1 s, while the first attempt hangs
        threads.append(threading.Thread(target=client))
        threads[-1].start()
        time.sleep(0.5)
    for thread in threads:
        thread.join(30)
    assert len(waits) == 3
    # Each waits for the attempt in flight at most, not for one more attempt after it.
    assert max(waits) < CONNECT_TIMEOUT + 1.0, waits
    assert all("timeout" in e for e in errors), errors
