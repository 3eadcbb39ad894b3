"""``hotweights_ipc_congestion_risk``: one number in [0, 1] from measured window quantities.

Inputs, all measured by the in-flight window (:mod:`hotweights_trainer.transports.window`):
``avg_ms`` -- the moving average of the time a bucket spends in flight (post until every receiver
acked it), ``target_ms`` (``HOTWEIGHTS_IPC_TARGET_BUCKET_MS``), the bytes in flight and the byte cap
(``HOTWEIGHTS_IPC_INFLIGHT_BYTES``), or, without a cap, the buckets in flight and the window.

Formula::

    time_pressure = clamp(avg_ms / target_ms - 1, 0, 1)   # 0 within target, 1 at twice the target
    fill          = clamp(inflight_bytes / byte_cap, 0, 1)  if byte_cap > 0
                    clamp(inflight_buckets / window, 0, 1)  otherwise
    pressure      = 0.5 * time_pressure + 0.5 * fill * time_pressure ** 0.5
    risk(now)     = max(pressure, risk(before) * 0.5 ** ((now - before) / half_life_s))

A full pipe alone is healthy (pipelining keeps it full), so ``fill`` counts only as far as buckets
are also slower than the target; ``pressure`` reaches 1 when buckets take twice the target while the
cap (or window) is full. Rising pressure shows at once; when it goes away the risk halves every
``half_life_s`` (default 2 s) instead of dropping to 0 at the next fast bucket, so a dashboard
sampling every few seconds still sees a burst.
"""

from __future__ import annotations

import math
from typing import Optional


def pressure(*, avg_ms: Optional[float], target_ms: float, inflight_bytes: int, byte_cap: int,
             inflight_buckets: int, window: int) -> float:
    """The instantaneous pressure term of the formula (pure)."""
    if target_ms <= 0:
        raise ValueError(f"target_ms must be > 0, got {target_ms}")
    t = 0.0 if avg_ms is None else min(max(avg_ms / target_ms - 1.0, 0.0), 1.0)
    if byte_cap > 0:
        fill = inflight_bytes / byte_cap
    else:
        fill = inflight_buckets / window if window > 0 else 0.0
    fill = min(max(fill, 0.0), 1.0)
    return 0.5 * t + 0.5 * fill * math.sqrt(t)


class CongestionRisk:
    """The decaying risk; ``now`` (seconds, any monotonic clock) is passed in, so it is testable."""

    def __init__(self, target_ms: float, *, half_life_s: float = 2.0):
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.target_ms = target_ms
        self.half_life_s = half_life_s
        self.risk = 0.0
        self._at: Optional[float] = None

    def value(self, now: float) -> float:
        """The risk at ``now`` with no new measurement (decayed)."""
        if self._at is None:
            return self.risk
        dt = max(now - self._at, 0.0)
        return self.risk * 0.5 ** (dt / self.half_life_s)

    def update(self, now: float, **measured) -> float:
        """Fold in a new measurement (keyword arguments of :func:`pressure` except target_ms)."""
        p = pressure(target_ms=self.target_ms, **measured)
        self.risk = max(p, self.value(now))
        self._at = now
        return self.risk


__all__ = ["CongestionRisk", "pressure"]
