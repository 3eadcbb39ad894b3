"""Measured transport counters: one :class:`TransportMeter` per transport instance.

It keeps :class:`~.base.TransportStats` (what ``transport.stats()`` returns, and what tests assert
on) and the Prometheus series of :mod:`hotweights_trainer.metrics` in step. Every value comes from a
real transfer: bytes and buckets when a bucket completes, seconds as measured from post to
completion, retries when one happens, window and in-flight values from the window controller, and
``hotweights_ipc_congestion_risk`` from those (formula in :mod:`hotweights_trainer.gpu.congestion`:
updated when a bucket completes or while buckets are in flight, decaying while idle).
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from .. import metrics
from ..gpu.congestion import CongestionRisk
from .base import TransportStats
from .window import WindowGate


class TransportMeter:
    def __init__(self, transport: str, endpoint: str, gate: Optional[WindowGate] = None):
        self.stats = TransportStats()
        self._gate = gate
        self._lock = threading.Lock()
        labels = (endpoint, transport)
        self._bytes = metrics.TRANSPORT_BYTES.labels(*labels)
        self._buckets = metrics.TRANSPORT_BUCKETS.labels(*labels)
        self._seconds = metrics.TRANSPORT_SECONDS.labels(*labels)
        self._retries = metrics.TRANSPORT_RETRIES.labels(*labels)
        self._window = metrics.IPC_WINDOW.labels(*labels)
        self._recommended = metrics.IPC_RECOMMENDED_WINDOW.labels(*labels)
        self._inflight_buckets = metrics.IPC_INFLIGHT_BUCKETS.labels(*labels)
        self._inflight_bytes = metrics.IPC_INFLIGHT_BYTES.labels(*labels)
        self._risk_gauge = metrics.IPC_CONGESTION_RISK.labels(*labels)
        self.risk = CongestionRisk(gate.window.target_ms) if gate is not None else None
        self.refresh()

    def moved(self, nbytes: int, seconds: float) -> None:
        """One bucket reached its destination(s) after ``seconds`` in flight."""
        with self._lock:
            self.stats.bytes_posted += nbytes
            self.stats.buckets_posted += 1
            self.stats.seconds_posting += seconds
        self._bytes.inc(nbytes)
        self._buckets.inc()
        self._seconds.inc(max(seconds, 0.0))
        self.refresh(measured=True)

    def retried(self, n: int = 1) -> None:
        with self._lock:
            self.stats.retries += n
        self._retries.inc(n)

    def refresh(self, measured: bool = False) -> None:
        """Copy the window's state into the stats and gauges; ``measured``: a bucket just completed."""
        if self._gate is None:
            return
        snap = self._gate.snapshot()
        now = time.monotonic()
        assert self.risk is not None
        with self._lock:
            if measured or snap["inflight_buckets"]:
                risk = self.risk.update(now, avg_ms=snap["avg_bucket_ms"] or None,
                                        inflight_bytes=int(snap["inflight_bytes"]), byte_cap=self._gate.window.max_bytes,
                                        inflight_buckets=int(snap["inflight_buckets"]), window=int(snap["window"]))
            else:
                risk = self.risk.value(now)
            s = self.stats
            s.window = int(snap["window"])
            s.inflight_buckets = int(snap["inflight_buckets"])
            s.inflight_bytes = int(snap["inflight_bytes"])
            s.inflight_buckets_high = int(snap["inflight_buckets_high"])
            s.inflight_bytes_high = int(snap["inflight_bytes_high"])
            s.extra["recommended_window"] = snap["recommended_window"]
            s.extra["avg_bucket_ms"] = snap["avg_bucket_ms"]
            s.extra["congestion_risk"] = risk
        self._window.set(snap["window"])
        self._recommended.set(snap["recommended_window"])
        self._inflight_buckets.set(snap["inflight_buckets"])
        self._inflight_bytes.set(snap["inflight_bytes"])
        self._risk_gauge.set(risk)


__all__ = ["TransportMeter"]
