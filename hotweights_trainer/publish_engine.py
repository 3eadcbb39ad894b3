"""What the publisher's engine thread does: the version and receiver records and every change to them.

:class:`PublisherEngine` is owned by one :class:`~hotweights_trainer.engine.EventLoop` thread. It
handles the transport's events (a receiver joined, sent a message, was lost; a tick) and the calls
``WeightPublisher.publish`` hands over from the caller's thread (:meth:`begin`, :meth:`post`,
:meth:`seal`, :meth:`commit`, :meth:`abort`). Nothing here takes a lock: every method runs on the
engine thread. Other threads read only :attr:`connected` (replaced whole on every change),
:attr:`relays` (likewise) and the fields of a record the caller waits on, after the engine notified.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any, Iterable, Optional

from . import metrics
from .config import SyncConfig
from .control.handles import Handle, sign_handle
from .control.janitor import free_handles
from .control.records import Committed, Decision, HandleKey, handle_key
from .control.session import CoordinatorApi
from .engine import Event, Failed, Joined, Lost, Message, Tick, engine_error
from .errors import HotweightsError, PeerLostError
from .publish_records import ReceiverRecord, VersionRecord
from .relay.forward import relay_info
from .transports.base import BucketBuffer, PublisherTransport

log = logging.getLogger("hotweights_trainer.publisher")


class PublisherEngine:
    def __init__(self, *, endpoint: Any, config: SyncConfig, tx: PublisherTransport,
                 session: CoordinatorApi, delta: Any, owner: str, session_id: int):
        self.endpoint = endpoint
        self.config = config
        self._ep = str(endpoint)
        self._tx = tx
        self._session = session
        self._delta = delta
        self._owner = owner
        self.session_id = session_id
        self._receivers: dict[str, ReceiverRecord] = {}
        self._versions: dict[int, VersionRecord] = {}
        self.committed: Optional[VersionRecord] = None
        self.current: Optional[VersionRecord] = None
        self.committed_version = session.claimed.committed
        self.connected: frozenset[str] = frozenset()
        """The receivers connected now; replaced whole, so any thread may read it."""
        self.relays: dict[str, dict[str, Any]] = {}
        """Host relays among the receivers: rid -> what the relay reported (replaced whole)."""
        self.refused = 0
        self.closed = False
        self.failure: Optional[HotweightsError] = None
        """An engine failure while no version was in flight; the next publish raises it."""
        self._last_coord_error = ""

    # ---------------------------------------------------------------- events (engine thread)
    def dispatch(self, event: Event) -> None:
        if isinstance(event, Message):
            self._message(event.rid, event.msg)
        elif isinstance(event, Tick):
            self._tick()
        elif isinstance(event, Joined):
            self._joined(event.rid, event.hello)
        elif isinstance(event, Lost):
            self._lost(event.rid, event.reason)
        elif isinstance(event, Failed):
            self.fail(event.error, f"running {event.where}")

    def fail(self, error: BaseException, what: str) -> None:
        """Engine code raised: fail the version in flight with the error as the cause (or keep it for
        the next publish). Logged here with its traceback, raised in the caller's thread."""
        rec = self.current
        err = engine_error(error, what, rec.version if rec is not None else None)
        log.error("%s", err, exc_info=error)
        if rec is not None and rec.state in ("sending", "waiting"):
            if rec.error is None:
                rec.error = err
        elif self.failure is None:
            self.failure = err

    def _set_connected(self) -> None:
        self.connected = frozenset(self._receivers)
        metrics.RECEIVERS.labels(self._ep).set(len(self.connected))

    def _joined(self, rid: str, hello: dict[str, Any]) -> None:
        token = self.config.coord_token
        if token is not None:
            given = hello.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
                reason = "missing token" if given is None else "wrong token"
                self.refused += 1
                metrics.REFUSED.labels(self._ep, reason).inc()
                log.warning("refused receiver %s on %s: %s", rid, self.endpoint, reason)
                hint = f"{reason}: set HOTWEIGHTS_COORD_TOKEN to the publisher's token"
                self._tx.send([rid], {"op": "refused", "reason": hint})
                self._tx.drop(rid, f"refused: {reason}")
                return
        live = hello["live_version"]
        host = hello.get("host")
        try:
            joined = self._session.register(rid, hello["pid"], host if isinstance(host, str) else "?", live)
        except HotweightsError as exc:
            log.error("coordinator refused receiver %s: %s; disconnecting it", rid, exc)
            self._tx.drop(rid, f"coordinator unavailable: {exc}")
            return
        self._receivers[rid] = ReceiverRecord(rid, hello["pid"], live, time.monotonic())
        self._set_connected()
        relay = relay_info(hello)
        if relay is not None:
            self.relays = {**self.relays, rid: relay}
        if self._delta is not None:
            self._delta.on_join(rid, hello)
        self._tx.send([rid], {"op": "welcome", "session": self.session_id, "pid": os.getpid(),
                              "version": joined.committed, "delta": self._delta is not None})
        log.info("receiver %s joined %s (live version %d)", rid, self.endpoint, live)
        if self.committed is not None:
            self._catch_up(rid, self.committed)

    def _coordinator_failed(self, what: str, exc: HotweightsError) -> None:
        """A relayed event could not be recorded: fail the waiting version with the real cause."""
        text = f"{type(exc).__name__}: {exc}"
        if text != self._last_coord_error:  # one line per distinct failure, not one per heartbeat
            log.warning("coordinator of %s could not record %s: %s", self.endpoint, what, text)
            self._last_coord_error = text
        rec = self.current
        if rec is not None and rec.state == "waiting" and rec.error is None:
            rec.error = exc

    def _message(self, rid: str, msg: dict[str, Any]) -> None:
        try:
            self._handle_message(rid, msg)
        except HotweightsError as exc:
            self._coordinator_failed(f"{msg['op']} from {rid}", exc)

    def _handle_message(self, rid: str, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if self._delta is not None:
            self._delta.on_message(rid, msg)  # resync requests; frees resync buffers
        if op == "heartbeat":
            report = relay_info(msg)
            if report is not None and rid in self.relays:
                self.relays = {**self.relays, rid: report}
            if not self._session.heartbeat(rid, msg["live_version"]) and rid in self._receivers:
                self._tx.drop(rid, "evicted by the coordinator; reconnect to register again")
            return
        rec = self._versions.get(msg.get("version", -1))
        if op == "staged" and rec is not None:
            self._staged(rid, rec, msg)
        elif op == "nack" and rec is not None:
            log.warning("receiver %s rejected version %d: %s: %s", rid, rec.version, msg["error"],
                        msg["message"][:500])
            if rid in rec.catchup:
                rec.catchup.pop(rid)
            else:
                rec.nacks[rid] = msg
                reason = f"{msg['error']}: {msg['message']}"
                self._set_decision(self._session.nack(rid, rec.version, reason))
        elif op == "committed" and rec is not None:
            rec.acked.add(rid)
        elif op == "release":
            self._released(handle_key(h.key) for h in self._session.ack(rid, msg["version"]))

    def _staged(self, rid: str, rec: VersionRecord, msg: dict[str, Any]) -> None:
        if rid in rec.catchup:
            rec.catchup.pop(rid)
            if rec.state == "committed":
                self._tx.send([rid], {"op": "commit", "version": rec.version})
            return
        rec.staged.add(rid)
        digest = msg.get("digest")
        digest = digest if isinstance(digest, str) else None
        self._set_decision(self._session.precommit(rid, rec.version, digest))

    def _lost(self, rid: str, reason: str) -> None:
        known = self._receivers.pop(rid, None) is not None
        self._set_connected()
        self._relay_lost(rid, reason)
        if self._delta is not None:
            self._delta.on_lost(rid)
        for rec in list(self._versions.values()):
            rec.catchup.pop(rid, None)
        if known:
            try:
                left = self._session.leave(rid)
                self._set_decision(left.decision)
                self._released(left.released)
            except HotweightsError as exc:
                log.warning("coordinator did not record that %s left: %s", rid, exc)
        for rec in list(self._versions.values()):
            self._maybe_recycle(rec)
        log.info("receiver %s left %s: %s", rid, self.endpoint, reason)

    def _tick(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        for rec in list(self._versions.values()):
            for rid, deadline in list(rec.catchup.items()):
                if now > deadline:
                    log.warning("receiver %s did not stage catch-up version %d in time; disconnecting",
                                rid, rec.version)
                    rec.catchup.pop(rid)
                    self._tx.drop(rid, "catch-up deadline missed")
                    self._maybe_recycle(rec)
        try:
            swept = self._session.sweep()
        except HotweightsError as exc:
            self._coordinator_failed("a sweep", exc)
            return
        for rid in swept.evicted:
            self._relay_lost(rid, "evicted: no heartbeat")  # before the decision below counts it out
            self._tx.drop(rid, f"no heartbeat for {self.config.heartbeat_ttl_s:.1f}s (evicted)")
        self._released(swept.released)
        self.expired(swept.expired)
        self._set_decision(swept.decision)

    def _relay_lost(self, rid: str, reason: str) -> None:
        """A relay left. It stands for a whole host: going on without it would commit a version some
        receivers never get, so the version in flight fails for everyone."""
        relay = self.relays.get(rid)
        if relay is None:
            return
        self.relays = {k: v for k, v in self.relays.items() if k != rid}
        rec = self.current
        if rec is not None and rid in rec.quorum and rec.error is None:
            rec.error = PeerLostError(f"relay {rid} (host {relay.get('host', '?')}) was lost during "
                                      f"version {rec.version}: {reason}")

    def _set_decision(self, d: Decision) -> None:
        rec = self.current
        if rec is not None and d.version == rec.version and rec.state == "waiting":
            rec.decision = d

    # ---------------------------------------------------------------- calls from publish (engine thread)
    def begin(self, step: Optional[int], min_version: Optional[int], peft: Optional[str]) -> VersionRecord:
        begun = self._session.begin(step, min_version)
        rec = VersionRecord(begun.version, step, peft=peft)
        rec.quorum = set(begun.quorum) & set(self._receivers)
        for other in self._versions.values():
            for rid in rec.quorum:  # this version supersedes any catch-up still in flight
                other.catchup.pop(rid, None)
        self._versions[rec.version] = rec
        self.current = rec
        self._send(rec.quorum, rec.begin_message(self.session_id))
        return rec

    def post(self, rec: VersionRecord, index: int, buf: BucketBuffer) -> None:
        rec.buffers.append(buf)
        if rec.error is None:
            self._tx.post(self.members(rec), rec.version, index, buf)

    def seal(self, rec: VersionRecord, end: dict[str, Any]) -> None:
        if rec.error is not None:
            raise rec.error
        rec.end = end
        rec.state = "waiting"
        members = self.members(rec)
        self._post_handles(rec, range(len(rec.buffers)), members)
        rec.decision = self._session.seal(rec.version, end["digest"], len(rec.buffers))
        self._send(members, end)

    def drop_waiting(self, rec: VersionRecord) -> list[str]:
        """The version missed its deadline: disconnect the quorum members that did not answer."""
        waiting = [r for r in self.members(rec) if r not in rec.staged and r not in rec.nacks]
        for rid in waiting:
            self._tx.drop(rid, f"did not stage version {rec.version} in time")
        return waiting

    def commit(self, rec: VersionRecord) -> tuple[Committed, list[str]]:
        """Record the commit with the coordinator and tell the ready receivers; returns the
        coordinator's answer and the receivers told."""
        committed = self._session.commit(rec.version)
        if self._delta is not None:
            self._delta.commit(rec.version)  # this version's snapshots become the next delta's bases
        rec.state = "committed"
        previous, self.committed = self.committed, rec
        self.committed_version = rec.version
        self.current = None
        told = [r for r in committed.ready if r in self._receivers]
        self._send(told, {"op": "commit", "version": rec.version})
        deadline = time.monotonic() + self.config.timeout_s
        for rid in committed.stragglers:  # majority quorum: they get the commit once they stage
            if rid in self._receivers:
                rec.catchup[rid] = deadline
        for rid in committed.failed:  # majority quorum: rejected it; reconnect and catch up
            self._tx.drop(rid, f"rejected version {rec.version}, which committed without it; resync")
        self._released(committed.released)  # the previous version's handles, now unpinned
        if previous is not None:
            self._maybe_recycle(previous)
        # Receivers that joined while this version was in flight were not in its quorum.
        for rid in list(self._receivers):
            if rid not in rec.quorum:
                self._catch_up(rid, rec)
        return committed, told

    def abort(self, rec: VersionRecord, reason: str, kind: str) -> None:
        if rec.state in ("committed", "aborted"):
            return
        rec.state = "aborted"
        if self.current is rec:
            self.current = None
        self._send(self.members(rec), {"op": "abort", "version": rec.version, "reason": reason[:2000]})
        try:
            self._session.abort(rec.version, reason[:2000], kind)
        except HotweightsError as exc:
            log.warning("coordinator did not record the abort of version %d: %s", rec.version, exc)
        rec.handles.clear()  # receivers discard aborted versions; the coordinator dropped its handles
        self._maybe_recycle(rec)
        log.warning("version %d aborted: %s", rec.version, reason)

    def drop_nonacking(self, rec: VersionRecord, waiting: list[str]) -> None:
        for rid in waiting:
            log.warning("receiver %s did not acknowledge the commit of version %d within %.1fs; "
                        "disconnecting it (it catches up when it reconnects)", rid, rec.version,
                        self.config.timeout_s)
            self._tx.drop(rid, f"no commit ack for version {rec.version}")

    def take_failure(self) -> Optional[HotweightsError]:
        err, self.failure = self.failure, None
        return err

    # ---------------------------------------------------------------- reads (any thread, after a notify)
    def members(self, rec: VersionRecord) -> list[str]:
        connected = self.connected
        return [rid for rid in rec.quorum if rid in connected]

    # ---------------------------------------------------------------- handles and buffers
    def _send(self, to: Iterable[str], msg: dict[str, Any]) -> None:
        self._tx.send(sorted(to), msg)

    def _post_handles(self, rec: VersionRecord, indices: Any, holders: list[str]) -> None:
        """Register the buffers of ``rec`` as handles held by ``holders``."""
        if not holders:
            return
        token = self.config.handle_token
        items = []
        for i in indices:
            name = rec.buffers[i].handle
            sig = sign_handle(token, self._ep, name, self._owner) if token is not None else ""
            items.append((rec.version, i, name, sig))
        self._session.post_handles(rec.version, items, self._owner, sorted(holders))
        rec.handles.update((v, i) for v, i, _, _ in items)

    def _released(self, keys: Iterable[HandleKey]) -> None:
        for version, index in keys:
            rec = self._versions.get(version)
            if rec is not None:
                rec.handles.discard((version, index))
                self._maybe_recycle(rec)

    def expired(self, handles: list[Handle]) -> None:
        """Handles whose holders never released them: free their memory (or a dead predecessor's)."""
        orphans = []
        for h in handles:
            rec = self._versions.get(h.version)
            if rec is None or h.owner != self._owner:
                orphans.append(h)  # a previous publisher's: free it if it is dead
                continue
            log.warning("handle %s (%s) of version %d expired with holder(s) %s; freeing its memory",
                        h.key, h.name, h.version, ", ".join(sorted(h.holders)))
            version, index = handle_key(h.key)
            rec.handles.discard((version, index))
            rec.expired.add(index)
            self._maybe_recycle(rec)
        if orphans:
            free_handles(self._ep, orphans, self.config)

    def _maybe_recycle(self, rec: VersionRecord) -> None:
        if rec is self.committed or rec is self.current or rec.handles or rec.catchup:
            return
        for index, buf in enumerate(rec.buffers):
            if index in rec.expired:
                self._tx.discard(buf)
            else:
                self._tx.recycle(buf)
        rec.buffers.clear()
        self._versions.pop(rec.version, None)

    def _catch_up(self, rid: str, rec: VersionRecord) -> None:
        """Send the committed version ``rec`` in full to one receiver (late join)."""
        if rec.end is None:
            return
        rec.catchup[rid] = time.monotonic() + self.config.timeout_s
        self._post_handles(rec, range(len(rec.buffers)), [rid])
        self._tx.send([rid], rec.begin_message(self.session_id))
        for index, buf in enumerate(rec.buffers):
            self._tx.post([rid], rec.version, index, buf)
        self._tx.send([rid], rec.end)


__all__ = ["PublisherEngine"]
