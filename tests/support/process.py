"""pgproxy as a real process, as deployed (for signals, and for failure paths best kept out of
the test process)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def proxy_process(
    config: Path, port: int, timeout: float = 15
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m pgproxy --config CONFIG`` until the block ends; yields once it accepts
    connections on ``port``; stops it (SIGTERM, then SIGKILL) afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    raise AssertionError(f"pgproxy exited with {proc.returncode}: {out}") from None
                assert time.monotonic() < deadline, "pgproxy did not start listening"
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
