"""pgproxy with two probes, for ``bench.memory``: ``python -m bench._instrumented_pgproxy
--config FILE`` runs ``pgproxy.cli.main`` unchanged, and

* counts calls of ``hashlib.pbkdf2_hmac`` (pgproxy's SCRAM code looks it up at call time, so
  the wrapper sees every derivation, in the event loop or a worker thread); ``COUNT_SIGNAL``
  writes the count to ``<dir>/pbkdf2-<k>.count``;
* with ``BENCH_TRACEMALLOC=1`` in the environment, runs under ``tracemalloc``;
  ``TRACE_SIGNAL`` writes a snapshot to ``<dir>/trace-<k>.snap``.

``<dir>`` is the config file's directory, ``k`` counts 0, 1, ... per signal. Files are written
under a temporary name and renamed, so one that exists is complete. Tracing slows pgproxy down
and adds memory of its own: use it to see *where* memory goes, never for the RSS figures.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pgproxy.cli import main

# Real-time signals: pgproxy itself uses SIGUSR1/SIGUSR2 (PAUSE/RESUME, as PgBouncer).
TRACE_SIGNAL = signal.SIGRTMIN + 1
COUNT_SIGNAL = signal.SIGRTMIN + 2
_lock = threading.Lock()
_pbkdf2_calls = 0
_original = hashlib.pbkdf2_hmac


def _counting_pbkdf2(
    hash_name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None
) -> bytes:
    global _pbkdf2_calls
    with _lock:
        _pbkdf2_calls += 1
    return _original(hash_name, password, salt, iterations, dklen)


def _writer(directory: Path, stem: str, write: Callable[[Path], None]) -> Callable[..., None]:
    count = 0

    def handler(_signum: int, _frame: FrameType | None) -> None:
        nonlocal count
        path = directory / f"{stem}-{count}"
        count += 1
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.rename(tmp, path)

    return handler


def _write_count(path: Path) -> None:
    path.write_text(str(_pbkdf2_calls))


def _install(directory: Path) -> None:
    hashlib.pbkdf2_hmac = _counting_pbkdf2  # type: ignore[assignment]
    signal.signal(COUNT_SIGNAL, _writer(directory, "pbkdf2", _write_count))
    if os.environ.get("BENCH_TRACEMALLOC") == "1":
        tracemalloc.start()
        signal.signal(
            TRACE_SIGNAL,
            _writer(directory, "trace", lambda p: tracemalloc.take_snapshot().dump(str(p))),
        )


if __name__ == "__main__":
    config = Path(sys.argv[sys.argv.index("--config") + 1])
    _install(config.resolve().parent)
    sys.exit(main())
