"""The MPI progress thread of the ``mpi`` transport.

Every MPI call the transport makes runs on one :class:`MpiThread` per process: it sends and receives
the framed control messages on ``COMM_WORLD`` (tag :data:`CTRL_TAG`), creates group communicators
(tag :data:`GROUP_TAG`), and tests outstanding requests, which is also what makes MPI progress.
It never runs engine code: on the publisher it puts events into the engine's queue (which only
enqueues), on a receiver into the ordered delivery (:mod:`.delivery`). An exception in the
transport's code on this thread goes to ``on_error`` (the engine's), so it fails the version it
belongs to instead of being logged and forgotten. The thread is stopped at interpreter exit, before
mpi4py finalizes MPI.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

from ..errors import PeerLostError, TransportUnavailableError, WireFormatError, missing_dependency
from ..wire import messages
from .base import TICK_S
from .delivery import EventPending

log = logging.getLogger("hotweights_trainer.transports.mpi")

CTRL_TAG = 0x4857   # "HW": control messages on COMM_WORLD
GROUP_TAG = 0x4858  # MPI_Comm_create_group tag
_HOT_S = 0.02  # keep polling this long after the last activity before idling in 1 ms waits
_live: "weakref.WeakSet[MpiThread]" = weakref.WeakSet()


def load_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError:
        raise missing_dependency("mpi4py", "mpi") from None
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise TransportUnavailableError(
            "the mpi transport needs MPI_THREAD_MULTIPLE (its progress thread runs beside the application's "
            f"MPI calls), but MPI provides level {MPI.Query_thread()}; use an MPI built with thread support")
    return MPI


@atexit.register
def _close_all() -> None:
    # mpi4py finalizes MPI after Python's atexit handlers; our threads must be gone by then.
    for t in list(_live):
        t.stop()


class MpiThread:
    """The one thread that makes the transport's MPI calls; everything else submits work to it."""

    def __init__(self, name: str, on_ctl: Callable[[int, dict[str, Any]], None], max_message_bytes: int):
        self.MPI = load_mpi()
        self.world = self.MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self._on_ctl = on_ctl
        self._max = max_message_bytes
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sends: list[tuple[Any, bytes]] = []
        self._reqs: list[Any] = []
        self._req_pending: list[EventPending] = []
        self.tickers: list[Callable[[], None]] = []
        self.on_error: Optional[Callable[[BaseException, str], None]] = None
        """Where an exception on this thread goes (the engine's ``on_error``); set before ``start``."""
        self._thread = threading.Thread(target=self._run, name=f"hotweights-mpi-{name}", daemon=True)
        _live.add(self)

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the MPI thread; the future carries its result or exception."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(PeerLostError("mpi transport closed"))
            return fut
        self._cmds.put((fn, fut))
        self._wake.set()
        return fut

    def send_ctl(self, dest: int, msg: dict[str, Any]) -> None:
        data = messages.encode(msg)[4:]  # the MPI message carries its own length
        self.submit(lambda: self._isend(dest, data))

    def track(self, reqs: list[Any], pending: EventPending) -> None:
        """(MPI thread) finish one part of ``pending`` per completed request."""
        self._reqs.extend(reqs)
        self._req_pending.extend([pending] * len(reqs))

    def forget(self, pending: EventPending) -> None:
        """(MPI thread) stop tracking the requests of ``pending`` (they may never complete)."""
        keep = [i for i, p in enumerate(self._req_pending) if p is not pending]
        self._reqs = [self._reqs[i] for i in keep]
        self._req_pending = [self._req_pending[i] for i in keep]

    def stop(self, timeout: float = 5.0) -> None:
        if self._stop.is_set():
            return
        # Let queued control messages (goodbyes) go out first.
        done = self.submit(lambda: None)
        try:
            done.result(timeout)
        except Exception:  # noqa: BLE001 - stopping anyway; whatever failed was logged on the thread
            pass
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the loop
    def _isend(self, dest: int, data: bytes) -> None:
        req = self.world.Isend([data, self.MPI.BYTE], dest=dest, tag=CTRL_TAG)
        self._sends.append((req, data))

    def _run(self) -> None:
        MPI = self.MPI
        status = MPI.Status()
        next_tick = time.monotonic() + TICK_S
        last_busy = 0.0
        while not self._stop.is_set():
            busy = False
            try:
                while True:
                    try:
                        fn, fut = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    busy = True
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # noqa: BLE001 - handed to the submitter via the future
                            fut.set_exception(exc)
                while self.world.Iprobe(source=MPI.ANY_SOURCE, tag=CTRL_TAG, status=status):
                    busy = True
                    self._recv_ctl(status)
                if self._reqs:
                    done = MPI.Request.Testsome(self._reqs)
                    if done:
                        busy = True
                        finished = set(done)
                        for i in sorted(finished):
                            self._req_pending[i].finish()
                        self._reqs = [r for i, r in enumerate(self._reqs) if i not in finished]
                        self._req_pending = [p for i, p in enumerate(self._req_pending) if i not in finished]
                if self._sends:
                    flags = [r.Test() for r, _ in self._sends]
                    self._sends = [s for s, f in zip(self._sends, flags) if not f]
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    for tick in self.tickers:
                        tick()
            except Exception as exc:  # noqa: BLE001 - handed to the engine; MPI progress must go on
                if self.on_error is None:
                    raise
                self.on_error(exc, "the mpi transport's progress thread")
            now = time.monotonic()
            if busy:
                last_busy = now
            elif self._reqs or now - last_busy < _HOT_S:
                # Data in flight (MPI progresses only inside calls) or a transfer just ended (its
                # next control message is due): poll often.
                time.sleep(0 if self._reqs else 2e-5)
            else:
                self._wake.wait(0.001)
                self._wake.clear()
        for req, _ in self._sends:
            try:
                if not req.Test():
                    req.Cancel()
            except Exception:  # noqa: BLE001 - shutting down; an undeliverable goodbye is harmless
                pass

    def _recv_ctl(self, status: Any) -> None:
        MPI = self.MPI
        source, n = status.Get_source(), status.Get_count(MPI.BYTE)
        buf = bytearray(max(n, 1))
        self.world.Recv([buf, n, MPI.BYTE], source=source, tag=CTRL_TAG)
        if n > self._max:
            log.warning("rank %d sent a %d-byte control message (limit %d); ignored", source, n, self._max)
            return
        try:
            msg = messages.decode(bytes(buf[:n]))
        except WireFormatError as exc:
            log.warning("rank %d sent a malformed control message: %s", source, exc)
            return
        self._on_ctl(source, msg)

    def create_group(self, ranks: Sequence[int]) -> Any:
        """(MPI thread) a communicator of ``ranks`` (rank 0 first); collective over exactly them."""
        group = self.world.Get_group().Incl(list(ranks))
        try:
            return self.world.Create_group(group, tag=GROUP_TAG)
        finally:
            group.Free()


__all__ = ["CTRL_TAG", "GROUP_TAG", "MpiThread", "load_mpi"]
