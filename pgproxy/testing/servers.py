"""Server processes on loopback for benchmarks and the demo (stdlib only): free ports, a clean
environment, start a server and wait until it accepts, stop it and everything it started.

Owns the life of a server process started by a harness: it runs in its own session, so a
Ctrl-C at the terminal reaches only the harness, which stops the server in order
(:func:`stop_server`, SIGTERM to the whole group, SIGKILL if it lingers).

Rule: every address here is 127.0.0.1; nothing is left running once :func:`stop_server` returns.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["clean_env", "free_port", "raise_nofile", "start_server", "stop_server"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """Our environment without PG* variables, so libpq only uses what we pass."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) now in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def start_server(
    name: str,
    cmd: list[str],
    port: int,
    log: Path,
    cwd: Path | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session (Ctrl-C reaches only us, and we stop it in order)
    and wait (up to ``timeout`` seconds) until it accepts TCP connections on 127.0.0.1:``port``.
    Its output goes to ``log``; ``env`` defaults to :func:`clean_env`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return proc
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on port {port}:\n{log.read_text()[-3000:]}")
    except BaseException:  # also Ctrl-C while waiting: never leave it running
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (runuser + pgbouncer), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
