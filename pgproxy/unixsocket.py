"""The unix-domain listening socket: ``<unix_socket_dir>/.s.PGSQL.<port>``, as Postgres names it.

Clients on the same host reach pgproxy with ``host=/that/dir`` (libpq reads a host that starts
with ``/`` as a socket directory). A unix socket costs the kernel a fraction of a loopback TCP
connection per send, which is what bounds fan-out to thousands of listeners (bench/RESULTS.md).

Binding is careful about the file that may already be there. The process first takes an
exclusive ``flock`` on ``<socket>.lock`` (kept, never removed, as the lock must outlive any one
holder), so two pgproxies never race between probing and binding. Then a socket file nobody
answers on is the leftover of a process that died, and is replaced; one that something answers
on (or that does not answer within a second: a wedged server) is another server's and is left
alone (``EADDRINUSE``) rather than stolen, as asyncio's own ``create_unix_server`` would; a
file that is not a socket is never removed. At exit the file is removed while still listening,
and only if it is still the one this process bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat

__all__ = ["UnixListener", "open_upstream", "socket_path", "upstream_socket"]

_BACKLOG = 4096
# sun_path holds 108 bytes with its terminating NUL on Linux.
_PATH_MAX = 107
_PROBE_TIMEOUT = 1.0


def socket_path(directory: str, port: int) -> str:
    return os.path.join(directory, f".s.PGSQL.{port}")


def upstream_socket(host: str, port: int) -> str | None:
    """The socket to reach an upstream ``host`` through, if it is a socket directory (a host
    starting with ``/``, as in libpq); None for a network host."""
    return socket_path(host, port) if host.startswith("/") else None


async def open_upstream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain stream connection to an upstream: its unix socket or TCP, as ``host`` says."""
    path = upstream_socket(host, port)
    if path is None:
        return await asyncio.open_connection(host, port)
    return await asyncio.open_unix_connection(path)


class UnixListener:
    """A bound, listening unix socket, the file it owns, and the lock that guards the name."""

    def __init__(self, directory: str, port: int, mode: int) -> None:
        self.path = socket_path(directory, port)
        if len(os.fsencode(self.path)) > _PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"unix socket path is too long: {self.path}")
        self._lock = _lock(self.path + ".lock")
        try:
            _clear_stale(self.path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.bind(self.path)
                os.chmod(self.path, mode)  # nobody can connect before listen()
                self.sock.listen(_BACKLOG)
                st = os.stat(self.path)
                self._identity = (st.st_dev, st.st_ino)
            except BaseException:
                self.sock.close()
                raise
        except BaseException:
            os.close(self._lock)
            raise

    def close(self) -> None:
        """Remove the file (unless someone replaced it), then close the socket and the lock."""
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        self.sock.close()
        os.close(self._lock)


def _lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EADDRINUSE, f"another pgproxy holds {path}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a dead process' leftover
        return
    except (TimeoutError, BlockingIOError):
        pass  # a listener whose backlog is full: alive, if wedged
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")
