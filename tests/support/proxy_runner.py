"""Run a pgproxy ``Proxy`` in a background thread with its own (uvloop) event loop.

Both synchronous code (psycopg in the test thread) and async tests (pytest-asyncio's
loop in the test thread) can talk to it, since the proxy never shares their loop.

``pgproxy.app`` / ``pgproxy.config`` are imported lazily (only when a proxy is made).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import uvloop

__all__ = ["ProxyThread"]

T = TypeVar("T")

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 30.0


def proxy_dsn(
    host: str, port: int, user: str, dbname: str, password: str | None, **params: Any
) -> str:
    """A libpq URI; extra keyword params become the query string."""
    userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    url = f"postgresql://{userinfo}@{host}:{port}/{quote(dbname, safe='')}"
    if params:
        url += "?" + urlencode({k: str(v) for k, v in params.items()}, quote_via=quote)
    return url


class ProxyThread:
    """A ``pgproxy.app.Proxy`` served from a dedicated thread and event loop.

    ``config`` is a ``pgproxy.config.Config`` or a TOML-shaped mapping, which is passed
    through ``parse_config``.
    """

    host: str = "127.0.0.1"

    def __init__(self, config: Any, *, name: str = "pgproxy-test") -> None:
        if isinstance(config, Mapping):
            from pgproxy.config import parse_config

            config = parse_config(config)
        self.config: Any = config
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxy: Any = None
        self._port: int | None = None
        self._ready = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._startup_error: BaseException | None = None
        self._stop_error: BaseException | None = None
        self._stopped = False
        #: exception contexts reported to the proxy loop's exception handler
        #: (e.g. "Task exception was never retrieved"); tests may assert it stays empty.
        self.loop_errors: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> ProxyThread:
        """Start the thread and block until the proxy listens; re-raise startup errors."""
        if self._thread is not None:
            raise RuntimeError("ProxyThread already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.stop()
            raise TimeoutError(f"proxy did not start within {_START_TIMEOUT_S}s")
        if self._startup_error is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            self._stopped = True
            raise self._startup_error
        return self

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._exception_handler)
        try:
            self._main_task = loop.create_task(self._main())
            loop.run_until_complete(self._main_task)
        except BaseException as e:  # pragma: no cover - defensive
            if not self._ready.is_set():
                self._startup_error = e
            else:
                self._stop_error = e
        finally:
            try:
                _cancel_all_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self._ready.set()

    async def _main(self) -> None:
        from pgproxy.app import Proxy

        self._stop_requested = asyncio.Event()
        try:
            proxy = Proxy(self.config)
            self._proxy = proxy
            await proxy.start()
            self._port = int(proxy.port)
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            if self._proxy is not None:
                try:
                    await asyncio.wait_for(self._proxy.stop(), _STOP_TIMEOUT_S)
                except BaseException:
                    pass
            return
        self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            try:
                await asyncio.wait_for(proxy.stop(), _STOP_TIMEOUT_S)
            except BaseException as e:
                self._stop_error = e

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def stop(self) -> None:
        """Stop the proxy, join the thread and close its loop. Idempotent.

        Re-raises an exception raised by ``Proxy.stop()``.
        """
        if self._stopped or self._thread is None:
            self._stopped = True
            return
        self._stopped = True
        loop, event, task = self._loop, self._stop_requested, self._main_task
        if loop is not None and not loop.is_closed():
            try:
                if self._ready.is_set() and event is not None:
                    loop.call_soon_threadsafe(event.set)
                elif task is not None:  # still starting (start() timed out): abort it
                    loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # loop closed in the meantime
                pass
        self._thread.join(_STOP_TIMEOUT_S + 5)
        if self._thread.is_alive():
            raise TimeoutError("proxy thread did not stop")
        if self._stop_error is not None:
            err, self._stop_error = self._stop_error, None
            raise err

    def __enter__(self) -> ProxyThread:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- access

    @property
    def proxy(self) -> Any:
        """The ``Proxy`` object. Only touch it from the proxy loop: use :meth:`call`."""
        return self._proxy

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("ProxyThread not started")
        return self._loop

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ProxyThread not started")
        return self._port

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        **params: Any,
    ) -> str:
        """libpq URI to the proxy; extra keyword params become the query string."""
        return proxy_dsn(self.host, self.port, user, dbname, password, **params)

    def call(self, fn: Callable[[Any], Awaitable[T] | T], timeout: float | None = 30.0) -> T:
        """Run ``fn(proxy)`` in the proxy loop and return its (awaited) result.

        Must not be called from the proxy thread itself. From async tests it blocks the
        test's loop while waiting; use ``await asyncio.to_thread(pt.call, fn)`` if needed.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("ProxyThread.call() from inside the proxy thread would deadlock")
        proxy = self._proxy
        if proxy is None:
            raise RuntimeError("ProxyThread not started")

        async def runner() -> T:
            result = fn(proxy)
            if inspect.isawaitable(result):
                return await result
            return result

        fut = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        return fut.result(timeout)


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
