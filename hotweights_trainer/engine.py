"""The publisher's event loop: one thread owns every version and receiver record.

Who runs what in a publisher:

- **the caller's thread** (``WeightPublisher.publish``) gathers tensors and packs them into transport
  buffers; every step that touches the records (begin, post, seal, commit, abort) it hands to the
  engine as a call and waits for with a deadline from ``SyncConfig``;
- **the transport's threads** (the control server, the MPI progress thread, ...) do the transport's
  own bookkeeping, then put typed events into the engine's queue (:class:`EventQueue`, which is the
  ``PublisherHandler`` the transport was started with): :class:`Joined`, :class:`Message`,
  :class:`Lost`, :class:`Tick` and :class:`Failed` (the transport's own code raised);
- **the engine thread** (:class:`EventLoop`) drains the queue in order and runs each event and call
  to completion. It is the only thread that changes a record, and the only one that calls the
  coordinator or sends on the publisher's behalf while a version is open.

So no lock is held across a transport ``post``/``send`` or a coordinator call: the engine thread
needs none, and the caller's thread only reads snapshots the engine replaces whole (the connected
receivers) or waits on :attr:`EventLoop.changed`, whose lock guards nothing but the wait itself.

An exception raised by engine code (an event handler, or a transport's code on its own thread,
reported as :class:`Failed`) is never swallowed: it fails the version in flight at once with an
:class:`~hotweights_trainer.errors.EngineError` whose ``__cause__`` is the original error, raised in
the caller of ``publish``; with no version in flight, the next ``publish`` raises it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from .errors import ClosedError, EngineError, HotweightsError, SyncTimeoutError
from .transports.base import TICK_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Joined:
    """A receiver connected and said hello (the transport accepted it)."""

    rid: str
    hello: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """A control message from a receiver (``staged``, ``nack``, ``heartbeat``, ...)."""

    rid: str
    msg: dict[str, Any]


@dataclass(frozen=True)
class Lost:
    """A receiver went away (closed, dropped, or its connection broke)."""

    rid: str
    reason: str


@dataclass(frozen=True)
class Tick:
    """About every ``TICK_S`` seconds: deadlines and the coordinator's sweep."""


@dataclass(frozen=True)
class Failed:
    """Code of the transport raised on the transport's own thread (``where`` says in what)."""

    error: BaseException
    where: str


Event = Union[Joined, Message, Lost, Tick, Failed]


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple
    future: Future


class EventQueue:
    """The ``PublisherHandler`` a publisher transport is started with: every method only enqueues,
    never blocks, and may be called from any thread."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._tick_lock = threading.Lock()
        self._tick_queued = False

    def on_join(self, rid: str, hello: dict[str, Any]) -> None:
        self._q.put(Joined(rid, hello))

    def on_message(self, rid: str, msg: dict[str, Any]) -> None:
        self._q.put(Message(rid, msg))

    def on_lost(self, rid: str, reason: str) -> None:
        self._q.put(Lost(rid, reason))

    def on_tick(self) -> None:
        with self._tick_lock:
            if self._tick_queued:
                return  # the engine is busy: one pending tick is enough
            self._tick_queued = True
        self._q.put(Tick())

    def on_error(self, error: BaseException, where: str) -> None:
        self._q.put(Failed(error, where))

    def put_call(self, call: _Call) -> None:
        self._q.put(call)

    def get(self, timeout: float) -> Any:
        item = self._q.get(timeout=timeout)
        if isinstance(item, Tick):
            with self._tick_lock:
                self._tick_queued = False
        return item


class EventLoop:
    """Runs ``dispatch(event)`` for every event, and calls handed over by other threads, in order on
    one thread. ``on_failure(error, what)`` gets what a dispatch raised."""

    def __init__(self, name: str, dispatch: Callable[[Event], None],
                 on_failure: Callable[[BaseException, str], None]):
        self.events = EventQueue()
        self.changed = threading.Condition()
        """Notified after every event and call; wait on it for a record to change."""
        self._gen = 0
        self._dispatch = dispatch
        self._on_failure = on_failure
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hotweights-engine-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the engine thread; the future carries its result or exception."""
        fut: Future = Future()
        if self._stopped.is_set():
            fut.set_exception(ClosedError("the publisher engine has stopped"))
        elif self.on_engine_thread:
            _run_call(_Call(fn, args, fut))
        else:
            self.events.put_call(_Call(fn, args, fut))
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``submit`` and wait up to ``timeout`` seconds for the result (re-raising its exception)."""
        fut = self.submit(fn, *args)
        try:
            return fut.result(timeout)
        except TimeoutError:
            if fut.done():
                raise  # fn itself raised a TimeoutError (SyncTimeoutError is one)
            fut.cancel()  # not started yet: it must not run after its caller gave up
            raise SyncTimeoutError(f"the publisher engine did not run {getattr(fn, '__name__', fn)} within "
                                   f"{timeout:.1f}s (it is busy with a transport call)") from None

    def wait_for(self, predicate: Callable[[], Any], deadline: float) -> Any:
        """Wait until ``predicate()`` is true (checked after every engine step) or ``deadline``
        (``time.monotonic()``) passes; returns the last value of the predicate. The predicate runs
        without any lock held: it reads records the engine replaces or only grows."""
        while True:
            gen = self._gen
            value = predicate()
            left = deadline - time.monotonic()
            if value or left <= 0:
                return value
            self.wait_change(gen, min(left, 0.5))

    @property
    def generation(self) -> int:
        """Counts engine steps; take it before reading records, then :meth:`wait_change`."""
        return self._gen

    def wait_change(self, since: int, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for an engine step after generation ``since``."""
        with self.changed:
            if self._gen == since:
                self.changed.wait(max(timeout, 0.0))

    def notify(self) -> None:
        with self.changed:
            self._gen += 1
            self.changed.notify_all()

    def stop(self, timeout: float) -> None:
        """Stop after the event being handled; events still queued are dropped (the transport is closed)."""
        self._stopped.set()
        self.events.put_call(_Call(lambda: None, (), Future()))
        if self._thread.is_alive() and not self.on_engine_thread:
            self._thread.join(timeout)
        self.notify()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                item = self.events.get(timeout=TICK_S * 2)
            except queue.Empty:
                continue
            if isinstance(item, _Call):
                _run_call(item)
            else:
                try:
                    self._dispatch(item)
                except Exception as exc:  # noqa: BLE001 - handed on: it fails the version it belongs to
                    self._on_failure(exc, f"handling {describe(item)}")
            self.notify()
        # Calls still queued must not leave their callers waiting for a deadline.
        while True:
            try:
                item = self.events.get(timeout=0)
            except queue.Empty:
                return
            if isinstance(item, _Call) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(ClosedError("the publisher engine has stopped"))


def _run_call(call: _Call) -> None:
    if not call.future.set_running_or_notify_cancel():
        return
    try:
        call.future.set_result(call.fn(*call.args))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller through the future
        call.future.set_exception(exc)


def describe(event: Event) -> str:
    if isinstance(event, Joined):
        return f"the join of {event.rid}"
    if isinstance(event, Message):
        return f"{event.msg.get('op')!r} from {event.rid}"
    if isinstance(event, Lost):
        return f"the loss of {event.rid}"
    if isinstance(event, Failed):
        return f"a failure in {event.where}"
    return "a tick"


def engine_error(error: BaseException, what: str, version: Optional[int]) -> HotweightsError:
    """The typed error a caller gets for a bug in engine code; ``__cause__`` is the original."""
    about = f"version {version}: " if version is not None else ""
    err = EngineError(f"{about}the publisher engine failed while {what}: {type(error).__name__}: {error}")
    err.__cause__ = error
    return err


__all__ = ["Event", "EventLoop", "EventQueue", "Failed", "Joined", "Lost", "Message", "Tick", "describe",
           "engine_error"]
