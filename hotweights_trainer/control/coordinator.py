"""``Coordinator``: one fleet's :class:`~.state.FleetState`, kept in a store, behind one lock.

Every method is one state transition: take the lock, make sure this process may write (the store's
lease), (re)load the state when leadership was just gained, apply the transition, write what it
changed to the store, and only then answer. A failed write drops the in-memory state, so the next
call reloads the truth instead of acting on a state nobody stored.

Methods take and return plain JSON values, so the same object serves an in-process publisher
(embedded backend) and remote publishers through ``hotweights coord serve`` (tcp backend).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from .. import metrics
from ..config import SyncConfig
from ..errors import CoordinatorError, HotweightsError
from .handles import Handle
from .state import FleetState
from .store import MemoryStore

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, fleet: str, config: SyncConfig, store: Any = None,
                 clock: Callable[[], float] = time.time):
        self.fleet = fleet
        self.config = config
        self.store = store if store is not None else MemoryStore()
        self.clock = clock
        self._lock = threading.RLock()
        self._state: Optional[FleetState] = None
        self._seen = {"posted": 0, "acked": 0, "expired": 0}
        # Labelled children resolved once: labels() costs more than the state transition itself.
        self._handle_counters = {"posted": metrics.HANDLES_POSTED.labels(fleet),
                                 "acked": metrics.HANDLES_ACKED.labels(fleet),
                                 "expired": metrics.HANDLES_EXPIRED.labels(fleet)}
        self._handles_active = metrics.HANDLES_ACTIVE.labels(fleet)
        self._member_gauges: dict[str, tuple[Any, Any]] = {}

    # ---------------------------------------------------------------- plumbing
    def _fresh(self) -> FleetState:
        c = self.config
        return FleetState(self.fleet, quorum=c.quorum, heartbeat_ttl_s=c.heartbeat_ttl_s,
                          version_timeout_s=c.timeout_s, handle_ttl_s=c.handle_ttl)

    def _ensure(self) -> FleetState:
        regained = self.store.ensure_leader()
        if self._state is None or regained:
            data = self.store.load()
            state = self._fresh()
            if data is None:
                state.mark_all_dirty()
                log.info("fleet %s: new coordinator state (generation %s, store %s)", self.fleet,
                         state.generation, self.store.kind)
            else:
                state.load(*data)
                log.info("fleet %s: resumed coordinator state from %s: epoch %d, committed version %d, "
                         "%d receiver(s)", self.fleet, self.store.kind, state.epoch, state.committed,
                         len(state.members))
            self._state = state
            self._seen = {"posted": state.handles.posted, "acked": state.handles.acked,
                          "expired": state.handles.expired}
        return self._state

    def _run(self, fn: Callable[[FleetState, float], Any]) -> Any:
        with self._lock:
            state = self._ensure()
            now = self.clock()
            try:
                result = fn(state, now)
            finally:
                dirty = state.take_dirty()
                if dirty:
                    try:
                        self.store.flush(state, dirty)
                    except HotweightsError:
                        self._state = None  # memory is ahead of the store: reload the truth next time
                        raise
            self._count_handles(state)
            return result

    def _count_handles(self, state: FleetState) -> None:
        t = state.handles
        for name, now_value in (("posted", t.posted), ("acked", t.acked), ("expired", t.expired)):
            delta = now_value - self._seen[name]
            if delta > 0:
                self._handle_counters[name].inc(delta)
            self._seen[name] = now_value
        self._handles_active.set(len(t))

    def _member_metrics(self, state: FleetState, rids: Any = None) -> None:
        for rid in (state.members if rids is None else rids):
            m = state.members.get(rid)
            if m is None:
                if self._member_gauges.pop(rid, None) is not None:
                    for g in (metrics.FLEET_RECEIVER_VERSION, metrics.FLEET_RECEIVER_LAG):
                        try:
                            g.remove(self.fleet, rid)
                        except KeyError:
                            pass  # never exported
                continue
            gauges = self._member_gauges.get(rid)
            if gauges is None:
                gauges = (metrics.FLEET_RECEIVER_VERSION.labels(self.fleet, rid),
                          metrics.FLEET_RECEIVER_LAG.labels(self.fleet, rid))
                self._member_gauges[rid] = gauges
            gauges[0].set(m.live_version)
            gauges[1].set(max(state.committed - m.live_version, 0))

    def _failure(self, state: FleetState, before: int) -> None:
        if state.counters["quorum_failures"] > before and state.recent:
            metrics.QUORUM_FAILURES.labels(self.fleet, state.recent[-1].get("kind") or "other").inc()

    def call(self, method: str, args: dict[str, Any]) -> Any:
        """Dispatch one request by name (the tcp server and in-process sessions both use this)."""
        fn = getattr(self, "op_" + method, None)
        if fn is None:
            raise CoordinatorError(f"unknown coordinator method {method!r}")
        return fn(**args)

    # ---------------------------------------------------------------- operations
    def op_claim(self, owner: dict[str, Any]) -> dict[str, Any]:
        def run(s: FleetState, now: float) -> dict[str, Any]:
            gone = list(s.members)
            before = s.counters["quorum_failures"]
            epoch = s.claim(now)
            old_handles = s.take_over_handles()
            self._failure(s, before)
            self._member_metrics(s, gone)
            log.info("fleet %s claimed by %s: epoch %d, committed version %d, next version %d", self.fleet,
                     owner, epoch, s.committed, s.next_version)
            return {"epoch": epoch, "committed": s.committed, "next_version": s.next_version,
                    "generation": s.generation, "expired": [h.to_dict() for h in old_handles]}
        return self._run(run)

    def op_register(self, epoch: int, rid: str, pid: int, host: str, live_version: int) -> dict[str, Any]:
        def run(s: FleetState, now: float) -> dict[str, Any]:
            out = s.register(epoch, rid, pid, host, live_version, now)
            self._member_metrics(s, [rid])
            return out
        return self._run(run)

    def op_heartbeat(self, epoch: int, rid: str, live_version: int) -> bool:
        def run(s: FleetState, now: float) -> bool:
            known = s.heartbeat(epoch, rid, live_version, now)
            self._member_metrics(s, [rid])
            return known
        return self._run(run)

    def op_leave(self, epoch: int, rid: str) -> dict[str, Any]:
        def run(s: FleetState, now: float) -> dict[str, Any]:
            out = s.leave(epoch, rid, now)
            self._member_metrics(s, [rid])
            return out
        return self._run(run)

    def op_begin(self, epoch: int, step: Optional[int], min_version: Optional[int] = None) -> dict[str, Any]:
        def run(s: FleetState, now: float) -> dict[str, Any]:
            before = s.counters["quorum_failures"]
            out = s.begin(epoch, step, now, min_version)
            self._failure(s, before)
            return out
        return self._run(run)

    def op_seal(self, epoch: int, version: int, digest: str, n_buckets: int) -> dict[str, Any]:
        return self._run(lambda s, now: s.seal(epoch, version, digest, n_buckets, now))

    def op_precommit(self, epoch: int, rid: str, version: int, digest: Optional[str]) -> dict[str, Any]:
        return self._run(lambda s, now: s.precommit(epoch, rid, version, digest, now))

    def op_nack(self, epoch: int, rid: str, version: int, reason: str) -> dict[str, Any]:
        return self._run(lambda s, now: s.nack(epoch, rid, version, reason, now))

    def op_commit(self, epoch: int, version: int) -> dict[str, Any]:
        def run(s: FleetState, now: float) -> dict[str, Any]:
            out = s.commit(epoch, version, now)
            self._member_metrics(s)
            return out
        return self._run(run)

    def op_abort(self, epoch: int, version: int, reason: str, kind: str = "publisher") -> bool:
        def run(s: FleetState, now: float) -> bool:
            before = s.counters["quorum_failures"]
            done = s.abort(epoch, version, reason, now, kind=kind)
            self._failure(s, before)
            return done
        return self._run(run)

    def op_post_handles(self, epoch: int, version: int, handles: list, owner: str, holders: list) -> int:
        items = []
        for h in handles:
            if (not isinstance(h, list) or len(h) != 3 or not all(isinstance(x, str) for x in h)):
                raise CoordinatorError("post_handles: each handle must be [key, name, signature] strings")
            items.append((h[0], h[1], h[2]))
        if not all(isinstance(r, str) for r in holders):
            raise CoordinatorError("post_handles: holders must be receiver id strings")
        return self._run(lambda s, now: s.post_handles(epoch, version, items, owner, list(holders), now))

    def op_ack(self, epoch: int, rid: str, version: int) -> list[dict[str, Any]]:
        return self._run(lambda s, now: [h.to_dict() for h in s.ack(epoch, rid, version, now)])

    def op_sweep(self, epoch: int) -> dict[str, Any]:
        """The publisher's periodic call: evict silent receivers, renew needed handles, expire the rest."""
        def run(s: FleetState, now: float) -> dict[str, Any]:
            s._fence(epoch)
            evicted, released = s.evict_expired(now)
            if evicted:
                metrics.EVICTIONS.labels(self.fleet).inc(len(evicted))
                log.warning("fleet %s: evicted %s (no heartbeat for %.1fs)", self.fleet, ", ".join(evicted),
                            s.heartbeat_ttl_s)
                self._member_metrics(s, evicted)
            s.handles.renew(s.pinned_versions(), now)
            expired = s.handles.expire(now)
            return {"evicted": evicted, "released": [h.key for h in released],
                    "expired": [h.to_dict() for h in expired], "decision": s.decision(now)}
        return self._run(run)

    def op_janitor(self, is_dead: Callable[[Handle], bool]) -> list[Handle]:
        """Housekeeping without a publisher: abort orphaned versions, expire handles of dead owners."""
        def run(s: FleetState, now: float) -> list[Handle]:
            before = s.counters["quorum_failures"]
            if s.expire_orphan(now):
                self._failure(s, before)
            return s.handles.expire(now, only=is_dead)
        return self._run(run)

    def op_status(self) -> dict[str, Any]:
        with self._lock:
            state = self._ensure()
            out = state.status(self.clock())
        out["store"] = self.store.leader_info()
        return out

    def close(self) -> None:
        self.store.close()


__all__ = ["Coordinator"]
