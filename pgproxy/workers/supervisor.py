"""The supervisor process, and the worker's end of its channel to it.

With ``workers = N`` the ``pgproxy`` command runs ``supervise``: it reserves the listen
address, starts N workers (``python -m pgproxy`` with ``WORKER_FLAG``), and keeps them running.
Workers never read the configuration file itself but a *snapshot* of it in the private
directory, which the supervisor replaces only with a version it has validated: SIGHUP re-reads
the file, and if it is valid swaps the snapshot and passes SIGHUP on to every worker (each
re-reads the snapshot); a worker restarted later runs the same configuration as its siblings,
never a half-edited file. SIGTERM/SIGINT drain every worker (SIGTERM; a second one is
immediate), SIGQUIT stops them (SIGQUIT), SIGUSR1/SIGUSR2 are passed on (pause/resume); a
worker still running ``shutdown_timeout + _STOP_MARGIN`` later is killed; the supervisor exits
0. A worker that exits on its own is logged and restarted with
exponential backoff. Each worker holds one end of a socketpair whose other end only the
supervisor has: the worker reports "ready" on it (``serve_supervisor``), and EOF on it means
the supervisor is gone (even by SIGKILL), so the worker shuts down instead of living on as an
orphan. Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the
supervisor stops them. The mock-auth key (``scram.MOCK_KEY_ENV``) is made once here and passed
in every worker's environment, so an unknown user's fake salt is the same on every worker.

Rule: both ends of the channel live here, and nothing else does: the supervisor never imports
``pgproxy.cli`` or ``pgproxy.app`` (it starts workers as processes, and loads configuration
only through the ``load`` callable the CLI gives it), and a worker's ``Proxy`` reaches it only
through ``serve_supervisor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pgproxy.auth import scram
from pgproxy.config import Config, ConfigError
from pgproxy.config.values import parse_listen
from pgproxy.filewatch import FileWatch
from pgproxy.ops import logs
from pgproxy.unixsocket import UnixListener, socket_path
from pgproxy.workers.role import WORKER_FLAG, WorkerRole

__all__ = ["serve_supervisor", "supervise"]

log = logging.getLogger("pgproxy")

_READY = b"R"
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 10.0
_STABLE = 10.0  # a worker that ran this long restarts without backoff
_STOP_MARGIN = 10.0  # beyond shutdown_timeout, before a worker that has not exited is killed


# --------------------------------------------------------------------------- worker side


def serve_supervisor(role: WorkerRole, on_lost: Callable[[], None]) -> Callable[[bool], None]:
    """Tell the supervisor this worker is ready, and call ``on_lost`` when it is gone.

    Returns how this worker stops every worker (the console's SHUTDOWN): it sends the
    supervisor the signal that drains (``True``: SIGTERM) or stops (SIGQUIT) them all."""
    supervisor = os.getppid()

    def stop_all(drain: bool) -> None:
        if os.getppid() != supervisor:  # gone: this worker is stopping anyway
            return
        log.info("asking the supervisor to %s every worker", "drain" if drain else "stop")
        os.kill(supervisor, signal.SIGTERM if drain else signal.SIGQUIT)

    channel = socket.socket(fileno=role.channel_fd)
    channel.setblocking(False)
    with contextlib.suppress(OSError):
        channel.send(_READY)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(channel.fileno())
            channel.close()
            log.error("the supervisor is gone; worker %d shutting down", role.index)
            # Nobody else will remove the directory (and the configuration snapshot in it).
            shutil.rmtree(role.peer_dir, ignore_errors=True)
            on_lost()

    loop.add_reader(channel.fileno(), readable)
    return stop_all


# --------------------------------------------------------------------------- supervisor


def _reserve(host: str, port: int, share: bool = False) -> tuple[list[socket.socket], int]:
    """Bind (without listening) the listen address with SO_REUSEPORT, as the workers will.

    Fails now, with a clear error, if the address is taken (also by another pgproxy's
    workers: the first bind is made without SO_REUSEPORT); resolves port 0 to one port all
    workers share; and keeps the port from being taken by anyone else between worker restarts.
    A bound socket that does not listen receives no connections.
    """
    sockets: list[socket.socket] = []
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            where = (*address[:1], port, *address[2:])
            # Taken by a listener, with or without SO_REUSEPORT: EADDRINUSE (unless sharing
            # the port with another pgproxy was asked for: so_reuseport).
            if port and not share:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(where)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(where)
            port = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets, port


class _Supervisor:
    def __init__(
        self, config: Config, argv: Sequence[str], load: Callable[[Path | None], Config]
    ) -> None:
        self.config = config
        self.count = config.proxy.workers
        self.argv = list(argv)
        self.load = load
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.reload_pending: set[int] = set()
        self.unix: UnixListener | None = None
        self.stopping = asyncio.Event()
        self.peer_dir = Path()
        # The config file, watched here, not in workers: a change reloads as SIGHUP does.
        self.watch: FileWatch | None = None
        self.watch_interval = config.proxy.config_watch_interval
        # One mock-auth key for every worker, restarted ones included, so all announce the
        # same salts (an unknown user's salt must not vary by worker: user enumeration).
        # Kept as given when the operator set a valid one; a full restart makes a new one.
        key = os.environ.get(scram.MOCK_KEY_ENV, "")
        if scram.parse_mock_key(key) is None:
            key = scram.new_mock_key()
        self.env = {**os.environ, scram.MOCK_KEY_ENV: key}

    async def run(self) -> int:
        settings = self.config.proxy
        host, port = settings.listen_host, settings.listen_port
        try:
            reserved, port = _reserve(host, port, settings.so_reuseport)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc)
            return 1
        if settings.listen_port == 0:
            self.argv += ["--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        if settings.metrics_listen:
            # Reserved as the listen address is; port 0 cannot be passed on to the workers.
            metrics = settings.metrics_listen
            try:
                metrics_host, metrics_port = parse_listen(metrics, "proxy.metrics_listen")
                if not metrics_port:
                    raise OSError("workers need a fixed port to share")
                reserved += _reserve(metrics_host, metrics_port)[0]
            except OSError as exc:
                log.error("cannot listen on %s (proxy.metrics_listen): %s", metrics, exc)
                for sock in reserved:
                    sock.close()
                return 1
        if settings.unix_socket_dir:
            try:
                self.unix = UnixListener(settings.unix_socket_dir, port, settings.unix_socket_mode)
            except OSError as exc:
                log.error(
                    "cannot listen on %s: %s", socket_path(settings.unix_socket_dir, port), exc
                )
                for sock in reserved:
                    sock.close()
                return 1
        self.peer_dir = Path(tempfile.mkdtemp(prefix="pgproxy-"))  # mode 0700
        if self.config.source is not None:
            try:
                self._snapshot()
            except ConfigError as exc:
                log.error("config error: %s", exc)
                shutil.rmtree(self.peer_dir, ignore_errors=True)
                for sock in reserved:
                    sock.close()
                if self.unix is not None:
                    self.unix.close()
                return 2
            self.argv += ["--config", str(self._snapshot_path)]
            self.watch = FileWatch(self.config.source, lambda: self.watch_interval, self.reload)
            self.watch.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, self._forward, sig)
        log.info("pgproxy supervisor (pid %d) starting %d workers on %s:%d", os.getpid(),
                 self.count, host, port)  # fmt: skip
        try:
            keepers = [loop.create_task(self._keep(i)) for i in range(self.count)]
            await self.stopping.wait()
            log.info("shutting down %d workers", self.count)
            # The unix socket file stays until the workers are gone: while they drain it is
            # how operators reach the admin console (other logins are refused with 57P03).
            # The workers drain (SIGTERM, forwarded), for shutdown_timeout at most.
            limit = self.config.proxy.shutdown_timeout + _STOP_MARGIN
            _, late = await asyncio.wait(keepers, timeout=limit)
            if late:
                log.error("%d worker(s) did not stop in %.0f s; killing", len(late), limit)
                self._signal_all(signal.SIGKILL)
                await asyncio.wait(keepers)
            return 0
        finally:
            if self.watch is not None:
                self.watch.stop()
            for sock in reserved:
                sock.close()
            if self.unix is not None:
                self.unix.close()
            shutil.rmtree(self.peer_dir, ignore_errors=True)

    def _forward(self, sig: int) -> None:
        """PgBouncer's signals, for every worker: SIGTERM and SIGINT drain (a second one is
        immediate), SIGQUIT stops at once, SIGUSR1/SIGUSR2 pause/resume."""
        if sig in (signal.SIGUSR1, signal.SIGUSR2):
            self._signal_all(sig)
            return
        self.stopping.set()
        # Workers ignore SIGINT (a terminal's Ctrl-C reaches them too): they drain on SIGTERM.
        self._signal_all(signal.SIGQUIT if sig == signal.SIGQUIT else signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    @property
    def _snapshot_path(self) -> Path:
        return self.peer_dir / "pgproxy.toml"

    def _snapshot(self) -> Config:
        """Copy the configuration file into the private directory if it is valid."""
        source = self.config.source
        assert source is not None
        fresh = self.peer_dir / "pgproxy.toml.new"
        try:
            fresh.write_bytes(source.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from None
        try:
            config = self.load(fresh)
        except ConfigError as exc:
            # Messages name the copy; the user edits the original.
            raise ConfigError(str(exc).replace(str(fresh), str(source))) from None
        os.replace(fresh, self._snapshot_path)
        return config

    def reload(self) -> None:
        if self.watch is not None:
            self.watch.mark()
        try:
            config = self._snapshot() if self.config.source is not None else self.load(None)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        logs.configure(config.proxy.log_level, config.proxy.log_format, "supervisor")
        self.watch_interval = config.proxy.config_watch_interval
        if config.proxy.workers != self.count:
            log.warning("workers = %d takes effect when pgproxy restarts (running %d)",
                        config.proxy.workers, self.count)  # fmt: skip
        for index, proc in self.procs.items():
            if index in self.ready:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)
            else:  # no SIGHUP handler yet: SIGHUP would kill it; tell it once it is ready
                self.reload_pending.add(index)
        log.info("configuration reloaded from %s; passed on to %d workers",
                 self.config.source or "built-in defaults", len(self.procs))  # fmt: skip

    async def _keep(self, index: int) -> None:
        """Run worker ``index`` until the supervisor stops, restarting it when it dies."""
        backoff = _BACKOFF_MIN
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            unix_fd = self.unix.sock.fileno() if self.unix is not None else -1
            role = WorkerRole(index, self.count, theirs.fileno(), self.peer_dir, unix_fd)
            cmd = [sys.executable, "-m", "pgproxy", *self.argv, WORKER_FLAG, role.arg()]
            fds = (theirs.fileno(),) if unix_fd < 0 else (theirs.fileno(), unix_fd)
            started = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=fds, env=self.env)
            except OSError as exc:
                log.error("cannot start worker %d: %s", index, exc)
                status = "not started"
            else:
                self.procs[index] = proc
                if self.stopping.is_set():
                    proc.send_signal(signal.SIGTERM)
                theirs.close()
                watcher = loop.create_task(self._watch_ready(index, proc, ours))
                code = await proc.wait()
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher  # off the event loop before its socket is closed
                del self.procs[index]
                self.ready.discard(index)
                self.reload_pending.discard(index)
                status = f"exited with code {code}" if code >= 0 else f"killed by signal {-code}"
                status = f"(pid {proc.pid}) {status}"
            finally:
                theirs.close()
                ours.close()
            if self.stopping.is_set():
                return
            if time.monotonic() - started >= _STABLE:
                backoff = _BACKOFF_MIN
            log.error("worker %d %s; restarting in %.1f s", index, status, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _watch_ready(
        self, index: int, proc: asyncio.subprocess.Process, channel: socket.socket
    ) -> None:
        data = await asyncio.get_running_loop().sock_recv(channel, 1)
        if data != _READY:
            return
        log.info("worker %d (pid %d) ready", index, proc.pid)
        self.ready.add(index)
        if index in self.reload_pending:
            self.reload_pending.discard(index)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)
        # Keep reading so the channel's buffer never matters; EOF comes when the worker exits.
        while await asyncio.get_running_loop().sock_recv(channel, 64):
            pass


def supervise(config: Config, argv: Sequence[str], load: Callable[[Path | None], Config]) -> int:
    """Run ``config.proxy.workers`` workers (``argv`` = this command's arguments) until
    SIGTERM/SIGINT; ``load(path)`` loads the configuration as this command would, but from
    ``path`` instead of its file (None: as it is)."""
    logs.configure(config.proxy.log_level, config.proxy.log_format, "supervisor")
    return asyncio.run(_Supervisor(config, argv, load).run())
