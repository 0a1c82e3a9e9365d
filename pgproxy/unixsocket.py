"""The unix-domain listening socket: ``<unix_socket_dir>/.s.PGSQL.<port>``, as Postgres names it.

Clients on the same host reach pgproxy with ``host=/that/dir`` (libpq reads a host that starts
with ``/`` as a socket directory). A unix socket costs the kernel a fraction of a loopback TCP
connection per send, which is what bounds fan-out to thousands of listeners (bench/RESULTS.md).

Binding is careful about the file that may already be there: a socket nobody answers on is the
leftover of a process that died, and is replaced; a socket something answers on is another
server's, and is left alone (``EADDRINUSE``) rather than stolen, which asyncio's own
``create_unix_server`` would do; anything that is not a socket is never removed. At exit the
file is removed only if it is still the one this process bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

__all__ = ["UnixListener", "socket_path"]

_BACKLOG = 4096
# sun_path holds 108 bytes with its terminating NUL on Linux.
_PATH_MAX = 107


def socket_path(directory: str, port: int) -> str:
    return os.path.join(directory, f".s.PGSQL.{port}")


class UnixListener:
    """A bound, listening unix socket and the file it owns."""

    def __init__(self, directory: str, port: int, mode: int) -> None:
        self.path = socket_path(directory, port)
        if len(os.fsencode(self.path)) > _PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"unix socket path is too long: {self.path}")
        _clear_stale(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.path)
            os.chmod(self.path, mode)
            self.sock.listen(_BACKLOG)
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        """Close the socket and remove its file, unless someone has replaced it meanwhile."""
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a dead process' leftover
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")
