"""The two UCX Python bindings behind one small interface: tagged sends and receives of host buffers.

- :class:`CoreBackend` -- ucxx's core API (``ucxx._lib.libucxx``): a UCX worker with its own
  progress thread, requests polled for completion. Used when ucx-py is not importable (ucxx is the
  one installable from PyPI today, and it moves host buffers over TCP).
- :class:`AsyncBackend` -- the asyncio API that ucx-py (``ucp``) has, and ucxx mirrors
  (``create_listener`` / ``create_endpoint`` / ``ep.send`` / ``ep.recv`` with ``force_tag``), run on
  a private event loop thread. Used with ``ucp`` when it is importable; the test suite exercises it
  through ucxx's identical API.

Both take UCX options (``HOTWEIGHTS_UCX_OPTIONS``, plus ``NET_DEVICES`` from
``HOTWEIGHTS_UCX_NET_DEVICES`` / ``NCCL_IB_HCA``) and expose:
``listen(on_endpoint) -> port``, ``connect(host, port) -> ep``, ``send(ep, array, tag) -> req``,
``recv(array, tag) -> req``, ``done(req)``, ``error(req)``, ``close_endpoint(ep)``, ``close()``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from typing import Any, Callable, Optional

from ..config import SyncConfig
from ..errors import TransportUnavailableError, missing_dependency
from .select import ucx_module

log = logging.getLogger(__name__)


def ucx_options(config: SyncConfig) -> dict[str, str]:
    """UCX options (without the ``UCX_`` prefix) from the config."""
    opts: dict[str, str] = {}
    for item in (config.ucx_options or "").split(","):
        key, sep, value = item.strip().partition("=")
        if sep and key:
            opts[key.strip().removeprefix("UCX_")] = value.strip()
    if config.ucx_net_devices:
        opts["NET_DEVICES"] = config.ucx_net_devices
    return opts


def create_backend(config: SyncConfig, *, prefer: Optional[str] = None) -> Any:
    """The backend for this process: ucx-py when importable, else ucxx (``prefer`` forces one)."""
    choice = prefer or ucx_module()
    if choice is None:
        raise missing_dependency("ucxx", "ucx", "ucxx-cu12")
    opts = ucx_options(config)
    if choice == "ucp":
        return AsyncBackend(importlib.import_module("ucp"), opts)
    if choice == "ucxx":
        return CoreBackend(opts)
    if choice == "ucxx-async":
        return AsyncBackend(importlib.import_module("ucxx"), opts)
    raise TransportUnavailableError(f"unknown UCX backend {choice!r}")


class CoreBackend:
    name = "ucxx"

    def __init__(self, options: dict[str, str]):
        try:
            import ucxx._lib.libucxx as ucx_api
            from ucxx._lib.arr import Array
        except ImportError:
            raise missing_dependency("ucxx", "ucx", "ucxx-cu12") from None
        self._api = ucx_api
        self._Array = Array
        try:
            self._ctx = ucx_api.UCXContext(config_dict=options,
                                           feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
            self._worker = ucx_api.UCXWorker(self._ctx)
            self._worker.start_progress_thread(polling_mode=False)
        except Exception as exc:  # noqa: BLE001 - UCX reports setup problems with its own exception types
            raise TransportUnavailableError(f"UCX (ucxx) could not start: {exc}") from exc
        self._listener: Any = None
        self._eps: list[Any] = []  # endpoints created from connection requests, kept alive
        self._lock = threading.Lock()

    def listen(self, on_endpoint: Optional[Callable[[Any], None]] = None) -> int:
        def accept(conn_request: Any) -> None:
            ep = self._listener.create_endpoint_from_conn_request(conn_request, True)
            with self._lock:
                self._eps.append(ep)
            if on_endpoint is not None:
                on_endpoint(ep)

        self._listener = self._api.UCXListener.create(worker=self._worker, port=0, cb_func=accept)
        return int(self._listener.port)

    def connect(self, host: str, port: int, timeout: float) -> Any:
        return self._api.UCXEndpoint.create(self._worker, host, port, True)

    def send(self, ep: Any, arr: Any, tag: int) -> Any:
        return ep.tag_send(self._Array(arr), self._api.UCXXTag(tag))

    def recv(self, arr: Any, tag: int) -> Any:
        return self._worker.tag_recv(self._Array(arr), self._api.UCXXTag(tag))

    @staticmethod
    def done(req: Any) -> bool:
        return bool(req.completed)

    @staticmethod
    def error(req: Any) -> Optional[BaseException]:
        try:
            req.check_error()
        except Exception as exc:  # noqa: BLE001 - the request's failure, returned to the caller
            return exc
        return None

    @staticmethod
    def alive(ep: Any) -> bool:
        return bool(ep.alive)

    def close_endpoint(self, ep: Any) -> None:
        try:
            ep.close()
        except Exception as exc:  # noqa: BLE001 - closing a dead endpoint may fail; it is gone either way
            log.debug("closing a UCX endpoint: %s", exc)

    def close(self) -> None:
        try:
            self._worker.stop_progress_thread()
        except Exception as exc:  # noqa: BLE001 - shutting down; nothing left to protect
            log.debug("stopping the UCX progress thread: %s", exc)
        with self._lock:
            self._eps.clear()
        self._listener = None


class AsyncBackend:
    """ucx-py's (and ucxx's) asyncio API driven from a private event loop thread."""

    def __init__(self, module: Any, options: dict[str, str]):
        self._m = module
        self.name = f"{module.__name__}-async"
        try:
            module.init(options=options)
        except RuntimeError:
            pass  # already initialised in this process (another transport); options of the first apply
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hotweights-ucx-loop", daemon=True)
        self._thread.start()
        self._listener: Any = None
        self._eps: list[Any] = []
        self._latest: Optional[asyncio.Future] = None

    def _run(self, coro: Any, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def listen(self, on_endpoint: Optional[Callable[[Any], None]] = None) -> int:
        async def setup() -> int:
            self._latest = self._loop.create_future()

            async def accept(ep: Any) -> None:
                self._eps.append(ep)
                if self._latest.done():
                    self._latest = self._loop.create_future()
                self._latest.set_result(ep)
                if on_endpoint is not None:
                    on_endpoint(ep)

            self._listener = self._m.create_listener(accept, port=0)
            return int(self._listener.port)

        return self._run(setup(), 30)

    def connect(self, host: str, port: int, timeout: float) -> Any:
        ep = self._run(self._m.create_endpoint(host, port), timeout)
        self._eps.append(ep)
        return ep

    def send(self, ep: Any, arr: Any, tag: int) -> Any:
        return asyncio.run_coroutine_threadsafe(ep.send(arr, tag=tag, force_tag=True), self._loop)

    def recv(self, arr: Any, tag: int) -> Any:
        async def go() -> None:
            while self._latest is None:
                await asyncio.sleep(0.01)
            ep = await self._latest
            await ep.recv(arr, tag=tag, force_tag=True)

        return asyncio.run_coroutine_threadsafe(go(), self._loop)

    @staticmethod
    def done(req: Any) -> bool:
        return req.done()

    @staticmethod
    def error(req: Any) -> Optional[BaseException]:
        if req.cancelled():
            return asyncio.CancelledError("UCX request cancelled")
        return req.exception()

    @staticmethod
    def alive(ep: Any) -> bool:
        return not _closed(ep)

    def close_endpoint(self, ep: Any) -> None:
        try:
            self._run(ep.close(), 5)
        except Exception as exc:  # noqa: BLE001 - closing a dead endpoint may fail; it is gone either way
            log.debug("closing a UCX endpoint: %s", exc)

    def close(self) -> None:
        for ep in self._eps:
            if not _closed(ep):
                self.close_endpoint(ep)
        self._eps.clear()
        self._listener = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _closed(ep: Any) -> bool:
    # ucx-py has Endpoint.closed(); ucxx made it a property.
    closed = ep.closed
    return bool(closed() if callable(closed) else closed)


__all__ = ["create_backend", "ucx_options", "CoreBackend", "AsyncBackend"]
