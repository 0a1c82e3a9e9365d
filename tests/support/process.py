"""pgproxy as a real process, as deployed (for signals, and for failure paths best kept out of
the test process)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def proxy_process(
    config: Path | None, port: int, timeout: float = 15, *, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m pgproxy --config CONFIG`` until the block ends; yields once it accepts
    connections on ``port``; stops it (SIGTERM, then SIGKILL) afterwards. ``config`` None: no
    ``--config``; ``env``: the process's whole environment (default: this one's)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", *(["--config", str(config)] if config else [])],
        cwd=ROOT,
        env=env,
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
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


EOF = "<EOF>"  # ProcessOutput's last line, once the output has ended


class ProcessOutput:
    """A running process's output (stdout and stderr merged), line by line as it comes: a
    thread reads it, so tests can wait for what happens inside the process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append(EOF)
            self.changed.notify_all()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 15) -> re.Match[str]:
        """The first line from index ``after`` on that matches ``pattern`` (waits for it)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            seen = after
            while True:
                for line in self.lines[seen:]:
                    found = regex.search(line)
                    if found:
                        return found
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == EOF):
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{tail}")
                self.changed.wait(left)

    def mark(self) -> int:
        """The index of the next line (for ``wait_for(after=...)``)."""
        with self.changed:
            return len(self.lines)

    def since(self, mark: int = 0) -> list[str]:
        with self.changed:
            return [line for line in self.lines[mark:] if line != EOF]


@contextmanager
def pgproxy_output(config: Path, *args: str) -> Iterator[ProcessOutput]:
    """``python -m pgproxy --config CONFIG ARGS`` with its output read as it comes; stopped
    (SIGTERM, then SIGKILL) when the block ends. Waiting for it to be ready is the caller's."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "--config", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield ProcessOutput(proc)
    finally:
        stop(proc)


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without pgproxy's configuration variables, plus ``variables``:
    what a container that configures pgproxy by its environment alone would pass."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGPROXY_") and k not in ("DATABASE_URL", "DATABASE_URLS")
    }
    return {**env, **variables}


def accepting(port: int, timeout: float = 30) -> None:
    """Until something accepts connections on 127.0.0.1:``port`` (a process started apart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "pgproxy did not start listening"
            time.sleep(0.05)


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident set now and at its peak (VmRSS, VmHWM), KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
