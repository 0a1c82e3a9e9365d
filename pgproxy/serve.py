"""The pgproxy process: logging, the event loop, signals, and the worker role if it has one.

Owns what happens between ``pgproxy.cli`` deciding to serve and the :class:`~pgproxy.app.Proxy`
running: uvloop, and PgBouncer's signals: SIGHUP reload (an invalid file keeps the running
configuration), SIGTERM and SIGINT drain (each client closed at its next transaction boundary,
``shutdown_timeout`` at most; a second one is immediate), SIGQUIT stop now, SIGUSR1/SIGUSR2
pause/resume; and in a worker of a multi-process pgproxy the channel to its peers (cancels,
snapshots, control commands) and the supervisor's liveness pipe (the supervisor forwards the
signals; the console's SHUTDOWN signals the supervisor). The log's level and
format (``pgproxy.ops.logs``) are set here, at start and again on SIGHUP.

Rule: signals are handled here and nowhere else; the proxy only offers the operations they
trigger (``reload``, ``control.drain``/``pause``/``resume``, ``stop``).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from collections.abc import Callable

from pgproxy.app import Proxy
from pgproxy.config import Config, ConfigError, load_config
from pgproxy.filewatch import FileWatch
from pgproxy.ops import logs
from pgproxy.ops.service import MetricsListenError
from pgproxy.pubsub.siblings import Siblings
from pgproxy.wire import log
from pgproxy.workers.peers import Peers
from pgproxy.workers.role import WorkerRole
from pgproxy.workers.supervisor import serve_supervisor


def run(
    config: Config, reload: Callable[[], Config] | None = None, role: WorkerRole | None = None
) -> int:
    """Run the proxy until drained (SIGTERM, SIGINT) or stopped (SIGQUIT, a second SIGTERM);
    SIGHUP calls ``reload`` for a fresh config; SIGUSR1/SIGUSR2 pause/resume every pool.

    ``role``: this process is one of several workers (``pgproxy.workers``)."""
    _configure_logging(config, role)
    if role is not None:  # Ctrl-C reaches the whole process group; the supervisor stops us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import uvloop

    load = reload or (lambda: load_config(config.source))
    return int(uvloop.run(_serve(config, load, role)))


def _freeze_startup_objects() -> None:
    """Keep what start-up made (modules, config, the parser: some 40,000 objects) out of the
    cyclic GC's full collections. Each full collection walked them all, and one such pause in
    a login storm (tens of milliseconds) was the established clients' worst latency."""
    gc.collect()
    gc.freeze()


def _configure_logging(config: Config, role: WorkerRole | None) -> None:
    process = "" if role is None else f"worker {role.index}"
    logs.configure(config.proxy.log_level, config.proxy.log_format, process)


async def _serve(config: Config, load: Callable[[], Config], role: WorkerRole | None = None) -> int:
    try:
        proxy = Proxy(config)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    proxy.loader = load
    if role is not None:
        proxy.peers = Peers(role)
        proxy.siblings = Siblings(proxy.peers, proxy.listeners, proxy.spawn)
        if role.unix_fd >= 0:
            proxy.inherited_unix = socket.socket(fileno=role.unix_fd)
    try:
        if proxy.peers is not None and proxy.siblings is not None:
            # Before any client: the siblings' servers known, and this worker's told.
            await proxy.peers.start(proxy)
            await proxy.siblings.learn()
        await proxy.start()
    except OSError as exc:
        if isinstance(exc, MetricsListenError):  # its message names the address
            log.error("%s", exc.strerror)
        else:
            log.error("cannot listen on %s:%d: %s", config.proxy.listen_host,
                      config.proxy.listen_port, exc)  # fmt: skip
        await proxy.stop()
        return 1
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    # A change of the config file reloads as SIGHUP does (pgproxy.filewatch); in a worker the
    # file is the supervisor's snapshot, and the supervisor watches the original.
    watch = None
    if config.source is not None and role is None:
        watch = FileWatch(
            config.source, lambda: proxy.config.proxy.config_watch_interval, lambda: reload()
        ).start()

    def reload() -> None:
        if watch is not None:
            watch.mark()
        try:
            fresh = load()
            proxy.reload(fresh)
            _configure_logging(fresh, role)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)

    control = proxy.control
    control.request_stop = stopping.set

    def pause() -> None:
        proxy.spawn(control.pause())

    loop.add_signal_handler(signal.SIGHUP, reload)
    # SIGTERM (and SIGINT, as PgBouncer's WAIT_FOR_SERVERS): close each client at its next
    # transaction boundary, then exit 0; a second one, or SIGQUIT, stops at once.
    loop.add_signal_handler(signal.SIGTERM, control.shutdown, True)
    loop.add_signal_handler(signal.SIGQUIT, control.shutdown, False)
    loop.add_signal_handler(signal.SIGUSR1, pause)
    loop.add_signal_handler(signal.SIGUSR2, control.resume)
    if role is None:
        loop.add_signal_handler(signal.SIGINT, control.shutdown, True)
    else:
        control.stop_workers = serve_supervisor(role, stopping.set)
    _freeze_startup_objects()
    await stopping.wait()
    if watch is not None:
        watch.stop()
    log.info("shutting down")
    control.stop_draining()
    await proxy.stop()
    if proxy.peers is not None:
        await proxy.peers.close()
    return 0
