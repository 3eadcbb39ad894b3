"""The in-flight window and backpressure shared by every transport that pipelines buckets.

Its settings are the ``window`` section of ``SyncConfig`` (flat names ``ipc_*``, a historical prefix:
they drive cuda_ipc, torch, mpi and ucx alike).

Two pieces, so the policy can be unit tested without threads:

``InflightWindow`` -- a small pure controller (no threads, no clock, no I/O). The transport asks
``can_admit(nbytes)`` before it starts moving a bucket, calls ``admitted(nbytes)`` when it does and
``completed(nbytes, seconds)`` when the bucket has arrived, with the bucket's measured time in flight.
It enforces

- the window: at most ``window`` buckets in flight (``HOTWEIGHTS_IPC_INFLIGHT_BUCKETS``, or the
  transport's own base such as ``--window`` for MPI);
- the byte cap: at most ``max_bytes`` bytes in flight (``HOTWEIGHTS_IPC_INFLIGHT_BYTES``, 0 = off).
  A single bucket larger than the cap is admitted only when nothing else is in flight, so a small
  cap slows transfers down but can never deadlock them;
- adaptation (``HOTWEIGHTS_IPC_ADAPT=1``): each completion updates an exponential moving average of
  the time a bucket spends in flight. The recommended window is the current window scaled by
  ``target_ms / average`` (a full pipe's latency grows with its depth), clamped to
  ``[min_inflight, max_inflight]``; the window then moves one step toward it per completion, so a
  noisy measurement cannot swing it.

It also keeps the high-water marks of buckets and bytes in flight, which tests assert on.

``WindowGate`` -- the blocking wrapper transports use from several threads: ``acquire(nbytes)``
waits (with a deadline, never forever) until the window admits the bucket, ``release(nbytes,
seconds)`` reports a completion and wakes the waiters.

Typical use (CUDA-IPC and the CPU transports alike)::

    gate = WindowGate(InflightWindow.from_config(cfg), timeout_s=cfg.timeout_s)
    gate.acquire(n)                  # before posting; SyncTimeoutError after timeout_s
    ... start moving the bucket ...
    gate.release(n, seconds)         # from whichever thread sees it complete
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import SyncConfig
from ..errors import ConfigError, SyncTimeoutError

log = logging.getLogger(__name__)

_EWMA_ALPHA = 0.3


@dataclass
class InflightWindow:
    """Pure window/backpressure controller. Not thread-safe by itself (see :class:`WindowGate`)."""

    window: int = 4
    max_bytes: int = 0
    adapt: bool = False
    target_ms: float = 250.0
    min_inflight: int = 1
    max_inflight: int = 16

    def __post_init__(self) -> None:
        problems = []
        if self.window < 1:
            problems.append(f"in-flight window must be >= 1, got {self.window}")
        if self.max_bytes < 0:
            problems.append(f"in-flight byte cap must be >= 0 (0 = off), got {self.max_bytes}")
        if not 1 <= self.min_inflight <= self.max_inflight:
            problems.append(f"window bounds must satisfy 1 <= min ({self.min_inflight}) <= max ({self.max_inflight})")
        if not self.target_ms > 0:
            problems.append(f"target bucket time must be > 0 ms, got {self.target_ms}")
        if problems:
            raise ConfigError(problems)
        if self.adapt:
            self.window = min(max(self.window, self.min_inflight), self.max_inflight)
        self.inflight_buckets = 0
        self.inflight_bytes = 0
        self.high_buckets = 0
        self.high_bytes = 0
        self.completed_buckets = 0
        self.avg_ms: Optional[float] = None
        self.recommended = self.window

    @classmethod
    def from_config(cls, cfg: SyncConfig, *, base: Optional[int] = None) -> "InflightWindow":
        """The window ``cfg.window`` (the ``HOTWEIGHTS_IPC_*`` knobs) describes; ``base`` overrides the
        starting window (mpi passes ``mpi_window``)."""
        w = cfg.window
        return cls(window=base if base is not None else w.inflight_buckets, max_bytes=w.inflight_bytes,
                   adapt=w.adapt, target_ms=w.target_bucket_s * 1e3, min_inflight=w.min_inflight,
                   max_inflight=w.max_inflight)

    def can_admit(self, nbytes: int) -> bool:
        if self.inflight_buckets == 0:
            return True  # always make progress, even with a bucket larger than the byte cap
        if self.inflight_buckets >= self.window:
            return False
        return not self.max_bytes or self.inflight_bytes + nbytes <= self.max_bytes

    def admitted(self, nbytes: int) -> None:
        self.inflight_buckets += 1
        self.inflight_bytes += nbytes
        self.high_buckets = max(self.high_buckets, self.inflight_buckets)
        self.high_bytes = max(self.high_bytes, self.inflight_bytes)

    def completed(self, nbytes: int, seconds: float) -> None:
        """One admitted bucket arrived (or failed) after ``seconds`` in flight."""
        if self.inflight_buckets <= 0:
            raise ValueError("completed() without a matching admitted()")
        self.inflight_buckets -= 1
        self.inflight_bytes = max(self.inflight_bytes - nbytes, 0)
        self.completed_buckets += 1
        ms = max(seconds, 0.0) * 1e3
        self.avg_ms = ms if self.avg_ms is None else (1 - _EWMA_ALPHA) * self.avg_ms + _EWMA_ALPHA * ms
        if not self.adapt:
            return
        ideal = self.window * self.target_ms / max(self.avg_ms, 1e-3)
        self.recommended = int(min(max(round(ideal), self.min_inflight), self.max_inflight))
        if self.recommended > self.window:
            self.window += 1
        elif self.recommended < self.window:
            self.window -= 1

    def reset_marks(self) -> None:
        """Forget the high-water marks (e.g. between benchmark runs)."""
        self.high_buckets = self.inflight_buckets
        self.high_bytes = self.inflight_bytes


class WindowGate:
    """Thread-safe blocking front of an :class:`InflightWindow`; every wait has a deadline."""

    def __init__(self, window: InflightWindow, *, timeout_s: float, name: str = "transport",
                 on_wait: Optional[Callable[[], None]] = None):
        self.window = window
        self.timeout_s = timeout_s
        self.name = name
        self._cond = threading.Condition()
        self._on_wait = on_wait
        self._broken: Optional[BaseException] = None

    def acquire(self, nbytes: int, *, timeout: Optional[float] = None) -> None:
        """Block until ``nbytes`` more may be in flight; SyncTimeoutError after the deadline."""
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        logged = False
        with self._cond:
            while not self.window.can_admit(nbytes):
                if self._broken is not None:
                    raise self._broken
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(
                        f"{self.name}: {self.window.inflight_buckets} bucket(s) / {self.window.inflight_bytes} bytes "
                        f"still in flight after {limit:.1f}s (window {self.window.window}, byte cap "
                        f"{self.window.max_bytes or 'off'}); a receiver is not taking data")
                if not logged:
                    log.debug("%s: window full (%d in flight, %d bytes); waiting", self.name,
                              self.window.inflight_buckets, self.window.inflight_bytes)
                    logged = True
                if self._on_wait is not None:
                    # Let the transport reap completions itself (polling transports).
                    self._cond.release()
                    try:
                        self._on_wait()
                    finally:
                        self._cond.acquire()
                    if self.window.can_admit(nbytes):
                        break
                self._cond.wait(min(left, 0.05 if self._on_wait is not None else 0.5))
            self.window.admitted(nbytes)

    def release(self, nbytes: int, seconds: float) -> None:
        with self._cond:
            self.window.completed(nbytes, seconds)
            self._cond.notify_all()

    def wait_idle(self, timeout: Optional[float] = None) -> None:
        """Block until nothing is in flight (bounded)."""
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._cond:
            while self.window.inflight_buckets:
                if self._broken is not None:
                    raise self._broken
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(f"{self.name}: {self.window.inflight_buckets} bucket(s) still in "
                                           f"flight after {limit:.1f}s")
                if self._on_wait is not None:
                    self._cond.release()
                    try:
                        self._on_wait()
                    finally:
                        self._cond.acquire()
                    if not self.window.inflight_buckets:
                        break
                self._cond.wait(min(left, 0.05 if self._on_wait is not None else 0.5))

    def fail(self, error: BaseException) -> None:
        """Wake every waiter with ``error`` (the transport broke); ``clear_failure`` undoes it."""
        with self._cond:
            self._broken = error
            self._cond.notify_all()

    def clear_failure(self) -> None:
        with self._cond:
            self._broken = None

    def snapshot(self) -> dict[str, float]:
        with self._cond:
            w = self.window
            return {"window": w.window, "recommended_window": w.recommended, "inflight_buckets": w.inflight_buckets,
                    "inflight_bytes": w.inflight_bytes, "inflight_buckets_high": w.high_buckets,
                    "inflight_bytes_high": w.high_bytes, "avg_bucket_ms": w.avg_ms or 0.0}


__all__ = ["InflightWindow", "WindowGate"]
