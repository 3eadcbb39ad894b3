"""Trainer side: gather -> bucket -> transport -> wait for every receiver to stage -> commit.

``WeightPublisher.publish`` is one version, all or nothing:

1. ``begin`` goes to the receivers connected now (the version's quorum);
2. tensors are packed into checksummed buckets, each posted as soon as it is full, so receivers
   verify bucket k while bucket k+1 is being packed;
3. ``end`` carries the bucket count and the manifest digest;
4. every quorum member answers ``staged`` (all buckets verified, manifest fits its model) or ``nack``;
   a member that disconnects leaves the quorum;
5. only when all have staged does ``commit`` go out; on any nack or a missed deadline ``abort`` goes
   out instead, and no receiver applies anything of that version;
6. ``publish`` returns once every receiver that got the commit acknowledged it (``committed``): the
   version is then pending there, so a ``poll()`` that follows ``publish`` applies it at once.

Receivers that connect later (or during a publish) are sent the current committed version in full
(catch-up) and then follow. A receiver that misses a deadline is disconnected so it cannot stall the
next version; it catches up when it reconnects.

Start and end of a run: with ``min_receivers`` the first ``publish`` waits (``receiver_wait_s``) until
that many receivers are connected. ``close`` lingers (``linger_s``) while the last version has not
reached every connected receiver, or no receiver at all, so a run shorter than the inference side's
start-up still delivers its final weights.

Who is in the quorum and whether a version may commit is decided by the fleet's coordinator
(:mod:`hotweights_trainer.control`): the publisher relays every receiver event to it (join,
heartbeat, staged, nack, release, loss) and acts on its answers. The coordinator runs in this
process by default; ``coord_backend`` moves its state to Redis or to ``hotweights coord serve``.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Optional

from . import metrics, peft_sync
from .config import SyncConfig
from .control.handles import Handle, sign_handle
from .control.janitor import free_handles, owner_tag
from .control.session import open_session
from .control.status_socket import StatusListener
from .delta.encoder import DeltaStats
from .delta.engine import make_publisher_delta
from .errors import (ClosedError, ConfigError, HotweightsError, PeerLostError, SyncTimeoutError,
                     VersionAbortedError)
from .naming import NameMap
from .publish_records import PublishResult, ReceiverRecord, VersionRecord, abort_kind, nack_error
from .relay.forward import ForwardedVersion, relay_info
from .source import iter_source
from .transports import create_publisher_transport, parse_endpoint
from .transports.base import PublisherTransport
from .wire.manifest import ManifestBuilder
from .wire.packer import plan_buckets

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 10.0  # how often a long wait for receivers says where it stands


class WeightPublisher:
    """Publishes versions of a model's weights to every receiver of ``endpoint``.

    ``source`` for :meth:`publish` is an ``nn.Module``, a ``Mapping[str, Tensor]`` or an iterable of
    ``(name, tensor)``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, endpoint: str, *, config: Optional[SyncConfig] = None, name_map: NameMap = None):
        self.config = config if config is not None else SyncConfig.from_env()
        self.endpoint = parse_endpoint(endpoint)
        self.name_map = name_map
        self._commit_hooks: list[Callable[[PublishResult], None]] = []
        self.session = secrets.randbits(63)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._publish_lock = threading.Lock()
        self._receivers: dict[str, ReceiverRecord] = {}
        self._versions: dict[int, VersionRecord] = {}
        self._committed: Optional[VersionRecord] = None
        self._current: Optional[VersionRecord] = None
        self._closed = False
        self._closing = False
        self._waited_for_receivers = False
        self._warned_no_receivers = False
        self.last_result: Optional[PublishResult] = None
        self._ep = str(self.endpoint)
        # Before the transport starts, so a taken metrics port leaves nothing half-started behind.
        metrics.start_exporter(self.config.metrics_port, self.config.metrics_host)
        self._owner = owner_tag()
        self._refused = 0
        self._last_coord_error = ""
        # Host relays among the receivers: rid -> what the relay reported (hello, then heartbeats).
        self._relays: dict[str, dict[str, Any]] = {}
        self._tx: PublisherTransport = create_publisher_transport(self.endpoint, self.config)
        # tcp://HOST:0: the transport bound a free port; what is keyed by the endpoint uses the real one.
        self.endpoint = self._tx.endpoint
        self._ep = str(self.endpoint)
        self._delta = make_publisher_delta(self.config, self._tx, session=self.session,
                                           endpoint_label=self._ep)
        # The status socket doubles as the "one publisher per endpoint on this host" check, before
        # the coordinator is claimed (a Redis-backed claim may wait for a lease).
        self._status = StatusListener(self._ep, self.status, self.config.timeout_s)
        try:
            self._session = open_session(self._ep, self.config)
            self._committed_version = self._session.claimed.get("committed", 0)
            self._expired(self._session.claimed.get("expired", []))  # a dead predecessor's handles
            self._tx.start(self)
        except BaseException:
            if self._delta is not None:
                self._delta.close()
            self._status.close()
            if getattr(self, "_session", None) is not None:
                self._session.close()
            raise
        log.info("publisher on %s (transport %s, bucket %d MiB, coordinator %s, epoch %d)", self.endpoint,
                 self._tx.name, self.config.bucket_mb, self._session.backend, self._session.epoch)

    # ---------------------------------------------------------------- public API
    @property
    def version(self) -> int:
        """The last committed version (0 before the first; a resumed fleet's last one)."""
        with self._lock:
            return self._committed_version

    @property
    def receivers(self) -> list[str]:
        with self._lock:
            return sorted(self._receivers)

    @property
    def transport(self) -> PublisherTransport:
        return self._tx

    def wait_for_receivers(self, n: int, timeout: Optional[float] = None) -> int:
        """Block until at least ``n`` receivers are connected; returns how many are.

        ``timeout`` defaults to ``config.timeout_s``. Logs a progress line every
        ``_PROGRESS_EVERY_S`` seconds while it waits; raises :class:`SyncTimeoutError` naming the
        endpoint after the deadline, or :class:`ClosedError` when the publisher closes meanwhile.
        """
        limit = self.config.timeout_s if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + limit
        next_note = t0 + _PROGRESS_EVERY_S
        with self._cond:
            if len(self._receivers) < n:
                log.info("waiting for %d receiver(s) on %s (%d connected, deadline %.0fs)", n, self.endpoint,
                         len(self._receivers), limit)
            while len(self._receivers) < n:
                if self._closed or self._closing:
                    raise ClosedError(f"publisher on {self.endpoint} closed while waiting for receivers")
                now = time.monotonic()
                if now >= deadline:
                    raise SyncTimeoutError(
                        f"only {len(self._receivers)} of {n} receivers connected to {self.endpoint} "
                        f"within {limit:.1f}s; start the inference side with the same endpoint, or lower "
                        "HOTWEIGHTS_MIN_RECEIVERS / raise HOTWEIGHTS_RECEIVER_WAIT_S")
                if now >= next_note:
                    log.warning("still waiting for receivers on %s: %d of %d connected after %.0fs "
                                "(deadline %.0fs)", self.endpoint, len(self._receivers), n, now - t0, limit)
                    next_note = now + _PROGRESS_EVERY_S
                self._cond.wait(min(deadline, next_note) - now)
            return len(self._receivers)

    def publish(self, source: Any, *, step: Optional[int] = None) -> PublishResult:
        """Send one version and return once every connected receiver has committed it.

        Raises :class:`SyncTimeoutError` when a receiver does not stage within ``timeout_s``,
        :class:`ManifestMismatchError` / :class:`CorruptBucketError` when a receiver rejects the version,
        in every case after aborting the version, so no receiver applies any of it.
        """
        with self._publish_lock:
            if self._closed or self._closing:
                raise ClosedError(f"publisher on {self.endpoint} is closed")
            if not self._waited_for_receivers and self.config.min_receivers > 0:
                self.wait_for_receivers(self.config.min_receivers, self.config.receiver_wait_s)
            self._waited_for_receivers = True  # only the first version waits: later ones go to who is there
            result = self._publish(source, step)
        for hook in list(self._commit_hooks):
            hook(result)
        return result

    def add_commit_hook(self, fn: Callable[[PublishResult], None]) -> None:
        """Call ``fn(result)`` after each committed version, in the thread that published it.

        For work that must follow every version, such as making a vLLM engine load it
        (:class:`~hotweights_trainer.integrations.vllm.VLLMUpdater`). An error from ``fn`` propagates
        out of :meth:`publish`; the version itself stays committed.
        """
        self._commit_hooks.append(fn)

    def close(self, linger: bool = True) -> None:
        """Stop publishing and free every buffer. Idempotent.

        With ``linger`` (and ``config.linger_s`` > 0), first keep serving the last committed version
        until every connected receiver has committed it and at least ``max(1, min_receivers)`` have,
        or ``linger_s`` ran out (logged).
        """
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()  # a first publish waiting for receivers gives up
        if linger:
            with self._publish_lock:  # a publish still running (another thread) finishes first
                self._linger()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if getattr(self, "_delta", None) is not None:
            self._delta.close()
        for part in ("_status", "_tx", "_session"):  # any of them may be missing if __init__ failed
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
        log.info("publisher on %s closed", self.endpoint)

    def status(self) -> dict[str, Any]:
        """The fleet as the coordinator sees it: receivers, live versions, lag, heartbeats, handles."""
        out = self._session.status()
        out["publisher"] = {"endpoint": self._ep, "pid": os.getpid(), "transport": self._tx.name,
                            "coord_backend": self._session.backend, "epoch": self._session.epoch,
                            "refused_requests": self._refused, "connected": sorted(self._receivers)}
        # Without the lock: a post may hold it for up to timeout_s, and a relay's heartbeat reports
        # this status upstream; a stalled heartbeat would get the relay evicted. dict() is atomic.
        out["relays"] = dict(self._relays)
        return out

    def __enter__(self) -> "WeightPublisher":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(linger=exc_type is None)  # after an error the last version may be the wrong one to leave

    def __del__(self) -> None:  # best effort: free shared memory of a publisher nobody closed
        try:
            if not self._closed:
                self.close(linger=False)  # never block a garbage collection
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to report to
            pass

    # ---------------------------------------------------------------- one version
    def _publish(self, source: Any, step: Optional[int]) -> PublishResult:
        cfg = self.config
        t0 = time.perf_counter()
        # A host relay republishes buckets verified upstream, as they arrive, under the upstream
        # version number, and commits only when the upstream fleet does (relay/forward.py).
        fwd = source if isinstance(source, ForwardedVersion) else None
        if fwd is not None and self._delta is not None:
            raise ConfigError("a relay republishes dense buckets: its publisher needs delta='off'")
        # A PEFT model becomes its merged or adapter tensors; refused adapters fail here, before begin.
        peft_form, source = (None, source) if fwd is not None else peft_sync.prepare(source, cfg.peft_mode)
        with self._lock:
            try:
                begun = self._session.begin(step, fwd.version if fwd is not None else None)
            except HotweightsError as exc:
                metrics.ERRORS.labels(self._ep, type(exc).__name__).inc()
                raise
            version = begun["version"]
            rec = VersionRecord(version, step, peft=peft_form)
            rec.quorum = set(begun["quorum"]) & set(self._receivers)
            for other in self._versions.values():
                for rid in rec.quorum:  # this version supersedes any catch-up still in flight
                    other.catchup.pop(rid, None)
            self._versions[version] = rec
            self._current = rec
            self._send(rec.quorum, rec.begin_message(self.session))
        manifest = ManifestBuilder()
        nbytes = 0
        t_pack = 0.0
        # FLUSH marks where a ZeRO-3 group ends: both planners pack what they hold before reading on.
        gather = _Timed(iter_source(source, self.name_map, flush_marks=True))
        delta = DeltaStats() if self._delta is not None else None
        try:
            planner = (fwd.buckets() if fwd is not None
                       else self._delta.plan(gather, version, rec.quorum, delta) if self._delta is not None
                       else plan_buckets(gather, cfg.bucket_bytes, cfg.torch_send_dtype))
            for index, plan in enumerate(planner):
                tp = time.perf_counter()
                buf = self._tx.alloc(plan.total_len)
                with self._lock:
                    rec.buffers.append(buf)
                buf.length = (plan.write_into(buf.mem, version=version, index=index, session=self.session)
                              if fwd is not None else
                              self._tx.pack(buf, plan, version=version, index=index, session=self.session))
                t_pack += time.perf_counter() - tp
                for entry in plan.entries:
                    manifest.add(entry)
                nbytes += buf.length
                with self._lock:
                    self._tx.post(self._members(rec), version, index, buf)
            t_sent = time.perf_counter()
            with self._lock:
                rec.end = {"op": "end", "version": version, "n_buckets": len(rec.buffers),
                           "digest": manifest.digest(), "n_tensors": len(manifest)}
                rec.state = "waiting"
                members = self._members(rec)
                self._post_handles(rec, range(len(rec.buffers)), members)
                rec.decision = self._session.seal(version, rec.end["digest"], len(rec.buffers))
                self._send(members, rec.end)
            self._wait_decision(rec)
            if fwd is not None:
                fwd.before_commit(version)  # upstream commits: so do we; upstream aborts: raises
            t_staged = time.perf_counter()
            with self._lock:
                committed = self._session.commit(version)
                if self._delta is not None:
                    self._delta.commit(version)  # this version's snapshots become the next delta's bases
                self._on_committed(rec, committed)
                told = [r for r in committed["ready"] if r in self._receivers]
        except BaseException as exc:
            self._abort(rec, f"{type(exc).__name__}: {exc}", abort_kind(exc))
            metrics.ERRORS.labels(self._ep, type(exc).__name__).inc()
            raise
        self._wait_acks(rec, told)
        if not committed["ready"] and not committed["stragglers"]:
            self._warn_no_receivers(version)
        t1 = time.perf_counter()
        t_encode = t_pack + (delta.encode_seconds if delta is not None else 0.0)
        dense_bytes = nbytes + (delta.dense_bytes - delta.payload_bytes if delta is not None else 0)
        result = PublishResult(
            version=version, bytes_sent=nbytes, tensors_sent=len(manifest), seconds=t1 - t0,
            buckets=len(rec.buffers), receivers=len(committed["ready"]), dense_bytes=dense_bytes, step=step,
            phases={"gather": gather.seconds, "encode": t_encode,
                    "transfer": max(t_sent - t0 - t_encode - gather.seconds, 0.0), "commit": t1 - t_sent,
                    "wait_staged": t_staged - t_sent}, delta=delta)
        for phase in ("gather", "encode", "transfer", "commit"):
            metrics.SYNC_SECONDS.labels(self._ep, phase).observe(result.phases[phase])
        metrics.BYTES.labels(self._ep).inc(nbytes)
        metrics.DENSE_BYTES.labels(self._ep).inc(result.dense_bytes)
        metrics.PUSH_BYTES.labels(self._ep).set(nbytes)
        metrics.PUSH_DENSE_BYTES.labels(self._ep).set(result.dense_bytes)
        if delta is not None:
            metrics.DELTA_DENSITY.labels(self._ep).set(delta.density)
            metrics.DELTA_SECONDS.labels(self._ep, "encode").observe(delta.encode_seconds)
        metrics.PUBLISHER_VERSION.labels(self._ep).set(version)
        self.last_result = result
        log.debug("published version %d: %d tensors, %.1f MB, %d receivers, %.1f ms", version,
                  result.tensors_sent, nbytes / 1e6, result.receivers, result.seconds * 1e3)
        return result

    def _members(self, rec: VersionRecord) -> list[str]:
        return [rid for rid in rec.quorum if rid in self._receivers]

    def _on_committed(self, rec: VersionRecord, committed: dict[str, Any]) -> None:
        """The coordinator recorded the commit: tell the ready receivers (lock held)."""
        rec.state = "committed"
        previous, self._committed = self._committed, rec
        self._committed_version = rec.version
        self._current = None
        self._send([r for r in committed["ready"] if r in self._receivers],
                   {"op": "commit", "version": rec.version})
        deadline = time.monotonic() + self.config.timeout_s
        for rid in committed["stragglers"]:  # majority quorum: they get the commit once they stage
            if rid in self._receivers:
                rec.catchup[rid] = deadline
        for rid in committed["failed"]:  # majority quorum: rejected it; reconnect and catch up
            self._tx.drop(rid, f"rejected version {rec.version}, which committed without it; resync")
        self._released(committed["released"])  # the previous version's handles, now unpinned
        if previous is not None:
            self._maybe_recycle(previous)
        # Receivers that joined while this version was in flight were not in its quorum.
        for rid in list(self._receivers):
            if rid not in rec.quorum:
                self._catch_up(rid, rec)

    def _wait_acks(self, rec: VersionRecord, told: list[str]) -> None:
        """Wait until every receiver told of the commit has it pending (its ``committed`` ack).

        The version is committed whatever happens here; a receiver that does not ack within
        ``timeout_s`` is disconnected (logged) and gets the version again as a late joiner.
        """
        deadline = time.monotonic() + self.config.timeout_s
        with self._cond:
            while True:
                waiting = [r for r in told if r in self._receivers and r not in rec.acked]
                if not waiting or self._closed:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    for rid in waiting:
                        log.warning("receiver %s did not acknowledge the commit of version %d within %.1fs; "
                                    "disconnecting it (it catches up when it reconnects)", rid, rec.version,
                                    self.config.timeout_s)
                        self._tx.drop(rid, f"no commit ack for version {rec.version}")
                    return
                self._cond.wait(min(left, 0.5))

    def _warn_no_receivers(self, version: int) -> None:
        if self._warned_no_receivers:
            return
        self._warned_no_receivers = True  # once per publisher: a run without inference is legitimate
        log.warning("version %d on %s was committed to zero receivers (none connected); a receiver that "
                    "connects later gets the newest version in full. Set HOTWEIGHTS_MIN_RECEIVERS to wait "
                    "for them before the first version (further zero-receiver versions are not logged)",
                    version, self.endpoint)

    def _linger(self) -> None:
        """Keep serving the last committed version until it reached the receivers (see :meth:`close`)."""
        limit = self.config.linger_s
        rec = self._committed
        if limit <= 0 or rec is None:
            return
        need = max(1, self.config.min_receivers)
        t0 = time.monotonic()
        next_note = t0
        with self._cond:
            while True:
                missing = sorted(r for r in self._receivers if r not in rec.acked)
                if not missing and len(rec.acked) >= need:
                    return
                now = time.monotonic()
                if now - t0 >= limit:
                    log.warning("closing %s after lingering %.1fs: its last version %d reached %d receiver(s)%s",
                                self.endpoint, limit, rec.version, len(rec.acked),
                                f"; not yet {', '.join(missing)}" if missing else "")
                    return
                if now >= next_note:
                    log.info("closing %s: serving version %d for up to %.0fs more until %s (HOTWEIGHTS_LINGER_S)",
                             self.endpoint, rec.version, limit - (now - t0),
                             f"{', '.join(missing)} commit(s) it" if missing else f"{need} receiver(s) have it")
                    next_note = now + _PROGRESS_EVERY_S
                self._cond.wait(min(t0 + limit, next_note) - now)

    def _wait_decision(self, rec: VersionRecord) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise ClosedError("publisher closed while a version was in flight")
                if rec.error is not None:
                    raise rec.error
                lost = self._tx.delivery_error(rec.version)
                if lost is not None:
                    raise lost
                d = rec.decision
                if d["decision"] == "commit":
                    return
                if d["decision"] == "abort" and d.get("kind") != "deadline":
                    if rec.nacks:
                        raise nack_error(rec.version, rec.nacks)
                    raise VersionAbortedError(rec.version, d.get("reason", "quorum not met"))
                left = deadline - time.monotonic()
                if left <= 0 or d["decision"] == "abort":
                    waiting = [r for r in self._members(rec) if r not in rec.staged and r not in rec.nacks]
                    for rid in waiting:
                        self._tx.drop(rid, f"did not stage version {rec.version} in time")
                    raise SyncTimeoutError(
                        f"version {rec.version}: receiver(s) {', '.join(sorted(waiting))} did not stage "
                        f"within {self.config.timeout_s:.1f}s; version aborted and they were disconnected")
                self._cond.wait(min(left, 0.5))

    def _set_decision(self, d: dict[str, Any]) -> None:
        rec = self._current
        if rec is not None and d.get("version") == rec.version and rec.state == "waiting":
            rec.decision = d
            self._cond.notify_all()

    def _abort(self, rec: VersionRecord, reason: str, kind: str) -> None:
        with self._lock:
            if rec.state in ("committed", "aborted"):
                return
            rec.state = "aborted"
            if self._current is rec:
                self._current = None
            self._send(self._members(rec), {"op": "abort", "version": rec.version, "reason": reason[:2000]})
            try:
                self._session.abort(rec.version, reason[:2000], kind)
            except HotweightsError as exc:
                log.warning("coordinator did not record the abort of version %d: %s", rec.version, exc)
            rec.handles.clear()  # receivers discard aborted versions; the coordinator dropped its handles
            self._maybe_recycle(rec)
        log.warning("version %d aborted: %s", rec.version, reason)

    def _send(self, to: Any, msg: dict[str, Any]) -> None:
        self._tx.send(sorted(to), msg)

    # ---------------------------------------------------------------- handles and buffers
    def _post_handles(self, rec: VersionRecord, indices: Any, holders: list[str]) -> None:
        """Register the buffers of ``rec`` as handles held by ``holders`` (lock held)."""
        if not holders:
            return
        token = self.config.handle_token
        items = []
        for i in indices:
            name = rec.buffers[i].handle
            sig = sign_handle(token, self._ep, name, self._owner) if token is not None else ""
            items.append([f"{rec.version}.{i}", name, sig])
        self._session.post_handles(rec.version, items, self._owner, sorted(holders))
        rec.handles.update(key for key, _, _ in items)

    def _released(self, keys: Any) -> None:
        for key in keys:
            version = int(str(key).split(".", 1)[0])
            rec = self._versions.get(version)
            if rec is not None:
                rec.handles.discard(key)
                self._maybe_recycle(rec)

    def _expired(self, handles: list[dict[str, Any]]) -> None:
        orphans = []
        for h in handles:
            rec = self._versions.get(h["version"])
            if rec is None or h["owner"] != self._owner:
                orphans.append(Handle.from_dict(h))  # a previous publisher's: free it if it is dead
                continue
            log.warning("handle %s (%s) of version %d expired with holder(s) %s; freeing its memory",
                        h["key"], h["name"], h["version"], ", ".join(h["holders"]))
            rec.handles.discard(h["key"])
            rec.expired.add(int(h["key"].split(".", 1)[1]))
            self._maybe_recycle(rec)
        if orphans:
            free_handles(self._ep, orphans, self.config)

    def _maybe_recycle(self, rec: VersionRecord) -> None:
        if rec is self._committed or rec is self._current or rec.handles or rec.catchup:
            return
        for index, buf in enumerate(rec.buffers):
            if index in rec.expired:
                self._tx.discard(buf)
            else:
                self._tx.recycle(buf)
        rec.buffers.clear()
        self._versions.pop(rec.version, None)

    # ---------------------------------------------------------------- transport callbacks
    def on_join(self, rid: str, hello: dict[str, Any]) -> None:
        token = self.config.coord_token
        if token is not None:
            given = hello.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
                reason = "missing token" if given is None else "wrong token"
                with self._lock:
                    self._refused += 1
                metrics.REFUSED.labels(self._ep, reason).inc()
                log.warning("refused receiver %s on %s: %s", rid, self.endpoint, reason)
                hint = f"{reason}: set HOTWEIGHTS_COORD_TOKEN to the publisher's token"
                self._tx.send([rid], {"op": "refused", "reason": hint})
                self._tx.drop(rid, f"refused: {reason}")
                return
        with self._lock:
            live = hello["live_version"]
            host = hello.get("host")
            try:
                joined = self._session.register(rid, hello["pid"], host if isinstance(host, str) else "?",
                                                live)
            except HotweightsError as exc:
                log.error("coordinator refused receiver %s: %s; disconnecting it", rid, exc)
                self._tx.drop(rid, f"coordinator unavailable: {exc}")
                return
            self._receivers[rid] = ReceiverRecord(rid, hello["pid"], live, time.monotonic())
            relay = relay_info(hello)
            if relay is not None:
                self._relays[rid] = relay
            if self._delta is not None:
                self._delta.on_join(rid, hello)
            metrics.RECEIVERS.labels(self._ep).set(len(self._receivers))
            self._tx.send([rid], {"op": "welcome", "session": self.session, "pid": os.getpid(),
                                  "version": joined["committed"], "delta": self._delta is not None})
            log.info("receiver %s joined %s (live version %d)", rid, self.endpoint, live)
            if self._committed is not None:
                self._catch_up(rid, self._committed)
            self._cond.notify_all()

    def _coordinator_failed(self, what: str, exc: HotweightsError) -> None:
        """A relayed event could not be recorded: fail the waiting version with the real cause (lock held)."""
        text = f"{type(exc).__name__}: {exc}"
        if text != self._last_coord_error:  # one line per distinct failure, not one per heartbeat
            log.warning("coordinator of %s could not record %s: %s", self.endpoint, what, text)
            self._last_coord_error = text
        rec = self._current
        if rec is not None and rec.state == "waiting" and rec.error is None:
            rec.error = exc
            self._cond.notify_all()

    def on_message(self, rid: str, msg: dict[str, Any]) -> None:
        try:
            self._on_message(rid, msg)
        except HotweightsError as exc:
            with self._lock:
                self._coordinator_failed(f"{msg['op']} from {rid}", exc)

    def _on_message(self, rid: str, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if self._delta is not None:
            self._delta.on_message(rid, msg)  # resync requests; frees resync buffers
        if op == "heartbeat":
            report = relay_info(msg)
            if report is not None:
                with self._lock:
                    if rid in self._relays:
                        self._relays[rid] = report
            if not self._session.heartbeat(rid, msg["live_version"]) and rid in self._receivers:
                self._tx.drop(rid, "evicted by the coordinator; reconnect to register again")
            return
        with self._lock:
            rec = self._versions.get(msg.get("version", -1))
            if op == "staged" and rec is not None:
                if rid in rec.catchup:
                    rec.catchup.pop(rid)
                    if rec.state == "committed":
                        self._tx.send([rid], {"op": "commit", "version": rec.version})
                else:
                    rec.staged.add(rid)
                    digest = msg.get("digest")
                    self._set_decision(self._session.precommit(rid, rec.version,
                                                               digest if isinstance(digest, str) else None))
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
                self._released(h["key"] for h in self._session.ack(rid, msg["version"]))
            self._cond.notify_all()

    def on_lost(self, rid: str, reason: str) -> None:
        with self._lock:
            known = self._receivers.pop(rid, None) is not None
            metrics.RECEIVERS.labels(self._ep).set(len(self._receivers))
            self._relay_lost(rid, reason)
            if self._delta is not None:
                self._delta.on_lost(rid)
            for rec in list(self._versions.values()):
                rec.catchup.pop(rid, None)
            if known:
                try:
                    left = self._session.leave(rid)
                    self._set_decision(left["decision"])
                    self._released(left["released"])
                except HotweightsError as exc:
                    log.warning("coordinator did not record that %s left: %s", rid, exc)
            for rec in list(self._versions.values()):
                self._maybe_recycle(rec)
            self._cond.notify_all()
        log.info("receiver %s left %s: %s", rid, self.endpoint, reason)

    def on_tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return
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
            for rid in swept["evicted"]:
                self._relay_lost(rid, "evicted: no heartbeat")  # before the decision below counts it out
                self._tx.drop(rid, f"no heartbeat for {self.config.heartbeat_ttl_s:.1f}s (evicted)")
            self._released(swept["released"])
            self._expired(swept["expired"])
            self._set_decision(swept["decision"])

    def _relay_lost(self, rid: str, reason: str) -> None:
        """A relay left (lock held). It stands for a whole host: going on without it would commit a
        version some receivers never get, so the version in flight fails for everyone."""
        relay = self._relays.pop(rid, None)
        rec = self._current
        if relay is not None and rec is not None and rid in rec.quorum and rec.error is None:
            rec.error = PeerLostError(f"relay {rid} (host {relay.get('host', '?')}) was lost during "
                                      f"version {rec.version}: {reason}")
            self._cond.notify_all()

    def _catch_up(self, rid: str, rec: VersionRecord) -> None:
        """Send the committed version ``rec`` in full to one receiver (late join)."""
        if rec.end is None:
            return
        rec.catchup[rid] = time.monotonic() + self.config.timeout_s
        self._post_handles(rec, range(len(rec.buffers)), [rid])
        self._tx.send([rid], rec.begin_message(self.session))
        for index, buf in enumerate(rec.buffers):
            self._tx.post([rid], rec.version, index, buf)
        self._tx.send([rid], rec.end)


class _Timed:
    """Wraps the source iterator to measure the time spent producing tensors (the gather phase)."""

    def __init__(self, it: Any):
        self._it = iter(it)
        self.seconds = 0.0

    def __iter__(self) -> "_Timed":
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - t
