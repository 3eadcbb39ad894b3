"""Leader lease in Redis: ``SET NX PX`` to acquire, compare-and-extend to renew, a fencing token per tenure.

Rules, and why:

- **Acquire** is one atomic script: ``SET lease HOLDER NX PX ms``; only on success ``INCR`` the fence
  counter and publish the new token as the fleet's current fence. Tokens only grow.
- **Renew** extends the key *only if it still holds our HOLDER value* (GET == me, then PEXPIRE). The
  holder never tries ``SET NX`` again, so it never loses the lease to itself (the earlier design
  re-acquired with SET NX, failed against its own key and flipped leadership every period).
- **Local validity** ends ``lease_ms`` minus a safety margin after the moment the acquire/renew
  *request was sent*. Redis expires the key no earlier than ``lease_ms`` after it *received* it, so
  the old holder stops acting as leader before anyone else can acquire: never two leaders.
- **Every write** of the fleet's state checks the fence token in the same script (see
  :mod:`.redis_store`), so a holder that was paused past its lease cannot write after a takeover.

Each acquisition, renewal, loss and release is logged with its token and wall-clock times
(``lease acquired: fleet=... token=N t=... valid_until=...``), an audit log from which the absence
of overlapping tenures can be checked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Optional

from .. import metrics

log = logging.getLogger(__name__)

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[3], t)
  return t
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One fleet's leader lease held (or sought) by this process. Thread-safe."""

    def __init__(self, client: Any, prefix: str, holder: dict[str, Any], lease_ms: int, fleet: str):
        self._r = client
        self.fleet = fleet
        self.lease_ms = int(lease_ms)
        self.key, self.seq_key, self.fence_key = prefix + "lease", prefix + "fence_seq", prefix + "fence"
        self.holder = json.dumps(holder, sort_keys=True, separators=(",", ":"))
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._lock = threading.Lock()
        self._gauge = metrics.COORD_LEADER.labels(fleet)
        self.token = 0
        self._valid_until = 0.0  # time.monotonic()
        margin = max(self.lease_ms * 0.1, 5.0) / 1000.0
        self._valid_s = self.lease_ms / 1000.0 - margin

    # ---------------------------------------------------------------- state
    def valid(self) -> bool:
        return self.token > 0 and time.monotonic() < self._valid_until

    def current_holder(self) -> Optional[dict[str, Any]]:
        """Who holds the lease now according to Redis (None when nobody)."""
        raw = self._r.get(self.key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            return {"raw": str(raw)[:200]}
        return value if isinstance(value, dict) else {"raw": str(raw)[:200]}

    # ---------------------------------------------------------------- transitions
    def try_acquire(self) -> bool:
        """Take the lease if it is free. True when this call made us the holder (new token)."""
        with self._lock:
            if self.valid():
                return False
            t_mono, t_wall = time.monotonic(), time.time()
            token = int(self._acquire(keys=[self.key, self.seq_key, self.fence_key],
                                      args=[self.holder, self.lease_ms]))
            if token <= 0:
                return False
            self.token = token
            self._valid_until = t_mono + self._valid_s
            self._gauge.set(token)
            log.info("lease acquired: fleet=%s token=%d holder=%s t=%.6f valid_until=%.6f",
                     self.fleet, token, self.holder, time.time(), t_wall + self._valid_s)
            return True

    def renew(self) -> bool:
        """Extend our lease. False (and the lease is dropped locally) when it is no longer ours."""
        with self._lock:
            if self.token <= 0:
                return False
            t_mono, t_wall = time.monotonic(), time.time()
            fence = int(self._renew(keys=[self.key, self.fence_key], args=[self.holder, self.lease_ms]))
            if fence != self.token:
                log.warning("lease lost: fleet=%s token=%d t=%.6f (current fence %d)", self.fleet, self.token,
                            time.time(), fence)
                self.token, self._valid_until = 0, 0.0
                self._gauge.set(0)
                return False
            self._valid_until = t_mono + self._valid_s
            log.debug("lease renewed: fleet=%s token=%d valid_until=%.6f", self.fleet, self.token,
                      t_wall + self._valid_s)
            return True

    def drop(self, reason: str) -> None:
        """Stop considering ourselves leader (an error told us we are fenced)."""
        with self._lock:
            if self.token:
                log.warning("lease lost: fleet=%s token=%d t=%.6f (%s)", self.fleet, self.token, time.time(),
                            reason)
            self.token, self._valid_until = 0, 0.0
            self._gauge.set(0)

    def release(self) -> None:
        """Give the lease up now so a standby can take over without waiting for it to expire."""
        with self._lock:
            if self.token <= 0:
                return
            t = time.time()
            self.token, self._valid_until = 0, 0.0  # stop acting as leader before the key goes
            self._gauge.set(0)
            try:
                self._release(keys=[self.key], args=[self.holder])
            finally:
                log.info("lease released: fleet=%s t=%.6f", self.fleet, t)


class LeaseKeeper:
    """Background thread renewing a lease every third of its length while held."""

    def __init__(self, lease: Lease, on_error: Any = None):
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hotweights-lease-{lease.fleet}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.lease.lease_ms / 3000.0
        while not self._stop.wait(period):
            if self.lease.token <= 0:
                continue
            try:
                self.lease.renew()
            except Exception as exc:  # noqa: BLE001 - Redis down/timeouts: logged; validity runs out alone
                log.warning("lease renewal for %s failed: %s", self.lease.fleet, exc)

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.lease.lease_ms / 1000.0 + 1.0)


__all__ = ["Lease", "LeaseKeeper"]
