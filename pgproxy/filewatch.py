"""Noticing that the configuration file changed, for files that change under a running proxy.

Owns :class:`FileWatch`, a task that looks at a path every few seconds and calls back when the
file it resolves to is a different one. Kubernetes updates a mounted ConfigMap or Secret by
writing a new directory and swapping a symlink (``..data``) to it, so the name a pod sees keeps
pointing at a new file whose mtime may even be older; an editor may rewrite in place instead.
The rule: a file's identity is its resolved path, device, inode, size and mtime, all read
through the symlinks; a change counts once two looks in a row agree on it (a file caught half
written is not loaded); the callback is whatever SIGHUP runs, so a watched change reloads
exactly as the signal does (an invalid file is logged and the running configuration kept);
nothing here reads the file's content.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["FileWatch", "identity"]

log = logging.getLogger("pgproxy")

Identity = tuple[str, int, int, int, int] | None  # None: missing or unreadable

_OFF_RECHECK = 5.0  # seconds between looks at a zero interval, which may be reloaded away


def identity(path: Path) -> Identity:
    """What ``path`` resolves to now: (resolved path, device, inode, size, mtime in ns)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    """Calls ``on_change`` when ``path`` changed; looks every ``interval()`` seconds (0: not)."""

    def __init__(
        self, path: Path, interval: Callable[[], float], on_change: Callable[[], None]
    ) -> None:
        self.path = path.absolute()  # a relative path stays the file it named at start
        self.interval = interval
        self.on_change = on_change
        self.seen = identity(self.path)  # what the running configuration was loaded from
        self.last = self.seen  # what the previous look found
        self.task: asyncio.Task[None] | None = None

    def start(self) -> FileWatch:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def mark(self) -> None:
        """The file is being loaded by someone else (SIGHUP): do not load it again for this."""
        self.seen = self.last = identity(self.path)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        while True:
            seconds = self.interval()
            await asyncio.sleep(seconds if seconds > 0 else _OFF_RECHECK)
            if seconds > 0:
                self.look()

    def look(self) -> None:
        """One look: reload when the file changed and the previous look saw it so too."""
        now = identity(self.path)
        settled, self.last = now == self.last, now
        if now != self.seen and settled:
            log.info("%s changed; reloading the configuration", self.path)
            self.seen = now
            self.on_change()
