"""What the user sees while the incident runs: a line per step (``[direct] 95 connected, 205
refused; ...``) and, on a terminal, one live status line under them, redrawn at most ten times
a second (workers connected and refused, jobs done with a bar, backends on PostgreSQL now
against max_connections).

Rule: it only shows; it is called with a :class:`~pgproxy.demo.incident.Phase` and decides
nothing. Off a terminal (or with ``TERM=dumb``) it writes the step lines alone, never an
escape sequence.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TextIO

from pgproxy.demo.incident import Phase

LABELS = {"direct": "direct", "pgproxy": "through pgproxy"}
_BAR = 20
_REDRAW_S = 0.1


def bar(done: int, total: int, width: int = _BAR) -> str:
    filled = min(width, width * done // total) if total > 0 else 0
    return "#" * filled + "." * (width - filled)


def status(phase: Phase, elapsed: float, limit: int) -> str:
    """The live line for ``phase``; ``limit``: PostgreSQL's max_connections."""
    label = LABELS.get(phase.target, phase.target)
    if phase.stage != "running":
        what = f"connecting: {phase.connected} in, {phase.refused} refused"
    elif phase.jobs_done_now < phase.jobs:
        what = f"jobs [{bar(phase.jobs_done_now, phase.jobs)}] {phase.jobs_done_now}/{phase.jobs}"
    else:
        what = f"all {phase.jobs} jobs done, counting notifications"
    return f"{label} {elapsed:4.1f}s | {what} | backends {phase.backends_now}/{limit}"


class Progress:
    """Shows a phase's steps on ``stream``; ``live`` (default: ``stream`` is a terminal) adds
    the status line, which shows backends against ``limit`` (max_connections)."""

    def __init__(self, stream: TextIO, limit: int, live: bool | None = None) -> None:
        self.stream = stream
        self.limit = limit
        if live is None:
            live = stream.isatty() and os.environ.get("TERM", "") != "dumb"
        self.live = live
        self._shown = False  # a status line is on screen
        self._drawn_at = 0.0
        self._started: dict[str, float] = {}

    def __call__(self, phase: Phase, line: str) -> None:
        if line:
            self.note(f"[{phase.target}] {line}")
        if self.live:
            self._draw(phase, force=bool(line))

    def note(self, text: str) -> None:
        """A line to keep, above the status line."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the status line (before anything else is written, and at the end)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def _draw(self, phase: Phase, force: bool) -> None:
        now = time.monotonic()
        started = self._started.setdefault(phase.target, now)
        if phase.stage in ("starting", "done"):
            self.clear()
            return
        if not force and now - self._drawn_at < _REDRAW_S:
            return
        self._drawn_at = now
        width = shutil.get_terminal_size((100, 24)).columns - 1
        self.stream.write("\r" + status(phase, now - started, self.limit)[:width] + "\x1b[K")
        self.stream.flush()
        self._shown = True
