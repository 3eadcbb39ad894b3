"""Receiver side of the copying transports: post receives early, hand results to the engine in order.

On torch, mpi and ucx, control messages and bucket bytes travel on different channels. The engine
must nevertheless see them in the publisher's order (``begin``, the buckets, ``end``, ``commit``):
an ``end`` processed before the last bucket's bytes arrived would reject a good version. So the
transport's control thread posts each bucket's receive as soon as its ``bucket`` message arrives
(pipelining with the publisher) and queues everything here; one delivery thread hands items to the
engine strictly in queue order, waiting for each bucket's bytes with the config deadline.

``abandon(version)`` is for ``abort`` and a lost publisher: waits on those buckets end at once
(their buffers are never reused, since a transfer may still write into them), and the items that
follow are delivered without delay.

A handler call that raises does not stop delivery (the items behind it still go out), and it is not
swallowed either: the error goes to ``handler.on_error``, so the receiver engine fails the version
it belongs to and raises it from ``poll``/``wait_for_version``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional, Protocol

from ..errors import PeerLostError, SyncTimeoutError
from .base import ReceiverHandler

log = logging.getLogger(__name__)

_SLICE_S = 0.1


class Pending(Protocol):
    """A receive in progress."""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once finished (successfully or not)."""

    def error(self) -> Optional[BaseException]:
        """The failure, once finished; None on success."""


class EventPending:
    """A :class:`Pending` finished by another thread calling :meth:`finish`."""

    __slots__ = ("_event", "_error", "_lock", "_parts", "_on_done")

    def __init__(self, parts: int = 1, on_done: Optional[Callable[["EventPending"], None]] = None):
        self._event = threading.Event()
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._parts = parts
        self._on_done = on_done
        if parts <= 0:
            self._event.set()

    def finish(self, error: Optional[BaseException] = None) -> None:
        """One part finished (the pending completes when all parts have, or at the first error)."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._parts -= 1
            fire = not self._event.is_set() and (self._parts <= 0 or error is not None)
            if fire:
                self._event.set()
        if fire and self._on_done is not None:
            self._on_done(self)

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def error(self) -> Optional[BaseException]:
        return self._error


class _Item:
    __slots__ = ("kind", "payload", "version", "index", "data", "pending", "abandoned", "on_abandon", "queued")

    def __init__(self, kind: str, payload: Any = None, version: int = -1, index: int = -1, data: Any = None,
                 pending: Optional[Pending] = None, on_abandon: Optional[Callable[[], None]] = None):
        self.kind = kind
        self.payload = payload
        self.version = version
        self.index = index
        self.data = data
        self.pending = pending
        self.abandoned = False
        self.on_abandon = on_abandon
        self.queued = time.monotonic()


class OrderedDelivery:
    """FIFO of engine callbacks; one daemon thread delivers them in order."""

    def __init__(self, handler: ReceiverHandler, *, timeout_s: float, name: str,
                 on_failed: Optional[Callable[[BaseException], None]] = None):
        self._handler = handler
        self._timeout = timeout_s
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._on_failed = on_failed
        self._thread = threading.Thread(target=self._run, name=f"hotweights-deliver-{name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- producers (transport threads)
    def frame(self, msg: dict[str, Any]) -> None:
        self._push(_Item("frame", msg))

    def connected(self, info: dict[str, Any]) -> None:
        self._push(_Item("connected", info))

    def lost(self, reason: str) -> None:
        self.abandon()
        self._push(_Item("lost", reason))

    def bucket(self, version: int, index: int, data: memoryview, pending: Pending,
               on_abandon: Optional[Callable[[], None]] = None) -> None:
        self._push(_Item("bucket", None, version, index, data, pending, on_abandon))

    def abandon(self, version: Optional[int] = None) -> int:
        """Stop waiting for the buckets of ``version`` (all versions when None); returns how many."""
        n = 0
        with self._cond:
            for item in self._items:
                if item.kind == "bucket" and not item.abandoned and (version is None or item.version == version):
                    item.abandoned = True
                    n += 1
            self._cond.notify_all()
        return n

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for item in self._items:
                item.abandoned = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._timeout)

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._items)

    def _push(self, item: _Item) -> None:
        with self._cond:
            if self._closed:
                return
            self._items.append(item)
            self._cond.notify_all()

    # ---------------------------------------------------------------- delivery thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait(0.5)
                if self._closed and not self._items:
                    return
                item = self._items[0]
            if item.kind == "bucket":
                self._deliver_bucket(item)
            else:
                self._call(item)
            with self._cond:
                if self._items and self._items[0] is item:
                    self._items.popleft()

    def _deliver_bucket(self, item: _Item) -> None:
        assert item.pending is not None
        deadline = item.queued + self._timeout
        while not item.abandoned:
            if item.pending.wait(_SLICE_S):
                break
            if time.monotonic() > deadline:
                err = SyncTimeoutError(f"bucket {item.index} of version {item.version} did not arrive within "
                                       f"{self._timeout:.1f}s")
                log.warning("%s", err)
                item.abandoned = True
                if item.on_abandon is not None:
                    item.on_abandon()
                self._safe(self._handler.on_bucket_failed, item.version, item.index, err)
                if self._on_failed is not None:
                    self._safe(self._on_failed, err)
                return
        if item.abandoned:
            if item.on_abandon is not None:
                item.on_abandon()
            return
        err = item.pending.error()
        if err is not None:
            log.warning("bucket %d of version %d failed: %s", item.index, item.version, err)
            if item.on_abandon is not None:
                item.on_abandon()
            self._safe(self._handler.on_bucket_failed, item.version, item.index,
                       err if isinstance(err, Exception) else PeerLostError(str(err)))
            if self._on_failed is not None:
                self._safe(self._on_failed, err)
            return
        self._safe(self._handler.on_bucket, item.version, item.index, item.data)

    def _call(self, item: _Item) -> None:
        if item.kind == "frame":
            self._safe(self._handler.on_message, item.payload)
        elif item.kind == "connected":
            self._safe(self._handler.on_connected, item.payload)
        elif item.kind == "lost":
            self._safe(self._handler.on_lost, item.payload)

    def _safe(self, fn: Callable, *args: Any) -> None:
        # The delivery thread must outlive a bug in one callback, or the receiver would stall forever;
        # the bug itself goes to the engine.
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the receiver engine; delivery goes on
            report = getattr(self._handler, "on_error", None)
            if report is None:
                raise
            report(exc, f"the receiver handler {getattr(fn, '__name__', fn)} on the delivery thread")


__all__ = ["OrderedDelivery", "Pending", "EventPending"]
