"""pgproxy with ``workers = N`` as a real process, shaped like ``ProxyThread`` for the tests.

``WorkersProxy(config_dict, workers)`` writes the TOML-shaped dict ``build_config`` makes to a
file, runs ``python -m pgproxy --config FILE`` with ``workers`` set, and waits until every
worker is ready; ``dsn``, ``host`` and ``port`` are as ``ProxyThread``'s. What runs inside the
processes cannot be reached from the test (``call`` raises): a test that needs that is marked
``in_process`` and runs with one in-process proxy only (``tests/conftest.py``).

Which worker served a connection is read from its virtual backend PID (``vpid_owner``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.process import ROOT, ProcessOutput
from tests.support.proxy_runner import proxy_dsn

_STARTED = r"starting (\d+) workers on [^ ]+:(\d+)"
_READY = re.compile(r"\[supervisor\]: worker (\d+) \(pid (\d+)\) ready")


def to_toml(data: dict[str, Any]) -> str:
    """The TOML of a config dict (tables of scalars and lists, as ``build_config`` makes)."""
    lines: list[str] = []

    def table(path: list[str], values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if path:
            lines.append("[" + ".".join(json.dumps(p) for p in path) + "]")
        lines.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in scalars.items())
        for key, value in values.items():
            if isinstance(value, dict):
                table([*path, key], value)

    table([], data)
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


class WorkersProxy:
    """A running ``pgproxy`` with ``workers`` worker processes."""

    host = "127.0.0.1"

    def __init__(self, config: dict[str, Any], workers: int = 2) -> None:
        proxy = {**config.get("proxy", {}), "workers": workers}
        self.data = {**config, "proxy": proxy}
        self.workers = workers
        self.pids: dict[int, int] = {}  # worker index -> pid
        self._dir = tempfile.TemporaryDirectory(prefix="pgproxy-workers-")
        self._proc: subprocess.Popen[bytes] | None = None
        self.output: ProcessOutput | None = None
        self._port = 0
        self.loop_errors: list[dict[str, Any]] = []  # as ProxyThread's: none seen from here

    def start(self, timeout: float = 30) -> WorkersProxy:
        path = Path(self._dir.name) / "pgproxy.toml"
        path.write_text(to_toml(self.data))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pgproxy", "--config", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = ProcessOutput(self._proc)
        self._port = int(self.output.wait_for(_STARTED, timeout=timeout)[2])
        deadline = time.monotonic() + timeout
        after = 0
        while len(self.pids) < self.workers:
            found = self.output.wait_for(_READY.pattern, after, deadline - time.monotonic())
            with self.output.changed:
                after = self.output.lines.index(found.string, after) + 1
            self.pids[int(found[1])] = int(found[2])
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        return self._port

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        **params: Any,
    ) -> str:
        return proxy_dsn(self.host, self.port, user, dbname, password, **params)

    def call(self, fn: Any, timeout: float | None = None) -> Any:
        raise RuntimeError("a multi-worker proxy runs in other processes: mark the test in_process")

    def log_lines(self) -> list[str]:
        return self.output.since() if self.output is not None else []

    def stop(self) -> None:
        """Stop now (SIGQUIT), SIGKILL whatever is left, never leave a worker behind."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.pids.values():
            if _is_our_worker(pid):
                os.kill(pid, signal.SIGKILL)
        self._dir.cleanup()


def _is_our_worker(pid: int) -> bool:
    """Whether ``pid`` still runs a pgproxy worker (not a zombie, not a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return b"--worker" in cmdline and re.search(r"^State:\s+Z", status, re.MULTILINE) is None
