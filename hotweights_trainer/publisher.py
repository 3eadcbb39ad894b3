"""Trainer side: gather -> bucket -> transport -> wait for every receiver to stage -> commit.

``WeightPublisher.publish`` is one version, all or nothing:

1. ``begin`` goes to the receivers connected now (the version's quorum);
2. tensors are packed into checksummed buckets, each posted as soon as it is full, so receivers
   verify bucket k while bucket k+1 is being packed;
3. ``end`` carries the bucket count and the manifest digest;
4. every quorum member answers ``staged`` (all buckets verified, manifest fits its model) or ``nack``;
   a member that disconnects leaves the quorum;
5. only when all have staged does ``commit`` go out; on any nack or a missed deadline ``abort`` goes
   out instead, and no receiver applies anything of that version.

Receivers that connect later (or during a publish) are sent the current committed version in full
(catch-up) and then follow. A receiver that misses a deadline is disconnected so it cannot stall the
next version; it catches up when it reconnects.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import metrics
from .config import SyncConfig
from .delta.encoder import DeltaStats
from .delta.engine import make_publisher_delta
from .errors import (ClosedError, CorruptBucketError, HotweightsError, ManifestMismatchError,
                     SyncTimeoutError, VersionAbortedError, WireFormatError)
from .naming import NameMap
from .source import iter_source
from .transports import create_publisher_transport, parse_endpoint
from .transports.base import BucketBuffer, PublisherTransport
from .wire.manifest import ManifestBuilder
from .wire.packer import pack_into, plan_buckets

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    """What one ``publish`` did. All numbers are measured."""

    version: int
    bytes_sent: int
    tensors_sent: int
    seconds: float
    buckets: int = 0
    receivers: int = 0
    dense_bytes: int = 0
    step: Optional[int] = None
    phases: dict[str, float] = field(default_factory=dict)
    delta: Optional[DeltaStats] = None
    """Delta-sync numbers of this version (changed elements, payload vs dense bytes); None when off."""

    @property
    def gbps(self) -> float:
        return self.bytes_sent / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Version:
    version: int
    step: Optional[int]
    quorum: set[str] = field(default_factory=set)
    buffers: list[BucketBuffer] = field(default_factory=list)
    end: Optional[dict[str, Any]] = None
    holders: set[str] = field(default_factory=set)
    staged: set[str] = field(default_factory=set)
    nacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    catchup: dict[str, float] = field(default_factory=dict)  # rid -> deadline
    state: str = "sending"  # sending -> waiting -> committed | aborted


@dataclass
class _Receiver:
    rid: str
    pid: int
    live_version: int
    joined: float


# Errors a receiver may report in a nack, re-raised on the trainer with their own type.
_NACK_TYPES: dict[str, type[HotweightsError]] = {
    "ManifestMismatchError": ManifestMismatchError,
    "CorruptBucketError": CorruptBucketError,
    "WireFormatError": WireFormatError,
}


class WeightPublisher:
    """Publishes versions of a model's weights to every receiver of ``endpoint``.

    ``source`` for :meth:`publish` is an ``nn.Module``, a ``Mapping[str, Tensor]`` or an iterable of
    ``(name, tensor)``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, endpoint: str, *, config: Optional[SyncConfig] = None, name_map: NameMap = None):
        self.config = config if config is not None else SyncConfig.from_env()
        self.endpoint = parse_endpoint(endpoint)
        self.name_map = name_map
        self.session = secrets.randbits(63)
        self._next_version = 1
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._publish_lock = threading.Lock()
        self._receivers: dict[str, _Receiver] = {}
        self._versions: dict[int, _Version] = {}
        self._committed: Optional[_Version] = None
        self._current: Optional[_Version] = None
        self._closed = False
        self.last_result: Optional[PublishResult] = None
        self._ep = str(self.endpoint)
        # Before the transport starts, so a taken metrics port leaves nothing half-started behind.
        metrics.start_exporter(self.config.metrics_port, self.config.metrics_host)
        self._tx: PublisherTransport = create_publisher_transport(self.endpoint, self.config)
        self._delta = make_publisher_delta(self.config, self._tx, session=self.session,
                                           endpoint_label=self._ep)
        self._tx.start(self)
        log.info("publisher on %s (transport %s, bucket %d MiB)", self.endpoint, self._tx.name,
                 self.config.bucket_mb)

    # ---------------------------------------------------------------- public API
    @property
    def version(self) -> int:
        """The last committed version (0 before the first)."""
        with self._lock:
            return self._committed.version if self._committed else 0

    @property
    def receivers(self) -> list[str]:
        with self._lock:
            return sorted(self._receivers)

    @property
    def transport(self) -> PublisherTransport:
        return self._tx

    def wait_for_receivers(self, n: int, timeout: Optional[float] = None) -> int:
        """Block until at least ``n`` receivers are connected; returns how many are."""
        deadline = time.monotonic() + (self.config.timeout_s if timeout is None else timeout)
        with self._cond:
            while len(self._receivers) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(
                        f"only {len(self._receivers)} of {n} receivers connected to {self.endpoint} "
                        f"within {timeout if timeout is not None else self.config.timeout_s:.1f}s")
                self._cond.wait(left)
            return len(self._receivers)

    def publish(self, source: Any, *, step: Optional[int] = None) -> PublishResult:
        """Send one version and return once every connected receiver has committed it.

        Raises :class:`SyncTimeoutError` when a receiver does not stage within ``timeout_s``,
        :class:`ManifestMismatchError` / :class:`CorruptBucketError` when a receiver rejects the version,
        in every case after aborting the version, so no receiver applies any of it.
        """
        with self._publish_lock:
            if self._closed:
                raise ClosedError(f"publisher on {self.endpoint} is closed")
            return self._publish(source, step)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._delta is not None:
            self._delta.close()
        self._tx.close()
        log.info("publisher on %s closed", self.endpoint)

    def __enter__(self) -> "WeightPublisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: free shared memory of a publisher nobody closed
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to report to
            pass

    # ---------------------------------------------------------------- one version
    def _publish(self, source: Any, step: Optional[int]) -> PublishResult:
        cfg = self.config
        t0 = time.perf_counter()
        with self._lock:
            version = self._next_version
            self._next_version += 1
            rec = _Version(version, step)
            rec.quorum = set(self._receivers)
            rec.holders = set(rec.quorum)
            for other in self._versions.values():
                for rid in rec.quorum:  # this version supersedes any catch-up still in flight
                    other.catchup.pop(rid, None)
            self._versions[version] = rec
            self._current = rec
            self._send(rec.quorum, {"op": "begin", "version": version, "session": self.session,
                                    "step": step})
        manifest = ManifestBuilder()
        nbytes = 0
        t_pack = 0.0
        gather = _Timed(iter_source(source, self.name_map))
        delta = DeltaStats() if self._delta is not None else None
        try:
            planner = (self._delta.plan(gather, version, rec.quorum, delta) if self._delta is not None
                       else plan_buckets(gather, cfg.bucket_bytes, cfg.torch_send_dtype))
            for index, plan in enumerate(planner):
                tp = time.perf_counter()
                buf = self._tx.alloc(plan.total_len)
                with self._lock:
                    rec.buffers.append(buf)
                buf.length = pack_into(buf.mem, plan, version=version, index=index, session=self.session)
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
                self._send(self._members(rec), rec.end)
            self._wait_staged(rec)
        except BaseException as exc:
            self._abort(rec, f"{type(exc).__name__}: {exc}")
            metrics.ERRORS.labels(self._ep, type(exc).__name__).inc()
            raise
        t_staged = time.perf_counter()
        if self._delta is not None:
            self._delta.commit(version)  # this version's snapshots become the next delta's bases
        with self._lock:
            rec.state = "committed"
            previous, self._committed = self._committed, rec
            self._current = None
            self._send(rec.staged, {"op": "commit", "version": version})
            if previous is not None:
                self._maybe_recycle(previous)
            # Receivers that joined while this version was in flight were not in its quorum.
            for rid in list(self._receivers):
                if rid not in rec.quorum:
                    self._catch_up(rid, rec)
        t1 = time.perf_counter()
        t_encode = t_pack + (delta.encode_seconds if delta is not None else 0.0)
        dense_bytes = nbytes + (delta.dense_bytes - delta.payload_bytes if delta is not None else 0)
        result = PublishResult(
            version=version, bytes_sent=nbytes, tensors_sent=len(manifest), seconds=t1 - t0,
            buckets=len(rec.buffers), receivers=len(rec.staged), dense_bytes=dense_bytes, step=step,
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

    def _members(self, rec: _Version) -> list[str]:
        return [rid for rid in rec.quorum if rid in self._receivers]

    def _wait_staged(self, rec: _Version) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise ClosedError("publisher closed while a version was in flight")
                waiting = [r for r in self._members(rec) if r not in rec.staged and r not in rec.nacks]
                if rec.nacks or not waiting:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    for rid in waiting:
                        self._tx.drop(rid, f"did not stage version {rec.version} in time")
                    raise SyncTimeoutError(
                        f"version {rec.version}: receiver(s) {', '.join(sorted(waiting))} did not stage "
                        f"within {self.config.timeout_s:.1f}s; version aborted and they were disconnected")
                self._cond.wait(min(left, 0.5))
            if rec.nacks:
                raise self._nack_error(rec)

    def _nack_error(self, rec: _Version) -> HotweightsError:
        rid, nack = sorted(rec.nacks.items())[0]
        etype = _NACK_TYPES.get(nack.get("error", ""))
        problems = nack.get("problems")
        if etype is ManifestMismatchError and isinstance(problems, dict):
            err: HotweightsError = ManifestMismatchError({str(k): str(v) for k, v in problems.items()})
        elif etype is not None and etype is not ManifestMismatchError:
            err = etype(f"receiver {rid} rejected version {rec.version}: {nack['message']}")
        else:
            err = VersionAbortedError(rec.version, "rejected by receivers",
                                      [f"{r}: {n.get('error')}: {n['message']}" for r, n in rec.nacks.items()])
        return err

    def _abort(self, rec: _Version, reason: str) -> None:
        with self._lock:
            if rec.state in ("committed", "aborted"):
                return
            rec.state = "aborted"
            if self._current is rec:
                self._current = None
            self._send(self._members(rec), {"op": "abort", "version": rec.version, "reason": reason[:2000]})
            rec.holders.clear()  # receivers discard aborted versions without further messages
            self._maybe_recycle(rec)
        log.warning("version %d aborted: %s", rec.version, reason)

    def _send(self, to: Any, msg: dict[str, Any]) -> None:
        self._tx.send(sorted(to), msg)

    # ---------------------------------------------------------------- buffers
    def _maybe_recycle(self, rec: _Version) -> None:
        if rec is self._committed or rec is self._current or rec.holders or rec.catchup:
            return
        for buf in rec.buffers:
            self._tx.recycle(buf)
        rec.buffers.clear()
        self._versions.pop(rec.version, None)

    # ---------------------------------------------------------------- transport callbacks
    def on_join(self, rid: str, hello: dict[str, Any]) -> None:
        with self._lock:
            live = hello["live_version"]
            self._receivers[rid] = _Receiver(rid, hello["pid"], live, time.monotonic())
            if self._delta is not None:
                self._delta.on_join(rid, hello)
            metrics.RECEIVERS.labels(self._ep).set(len(self._receivers))
            if live >= self._next_version:
                # A restarted publisher continues numbering above what receivers already run.
                log.info("receiver %s runs version %d; continuing numbering from %d", rid, live, live + 1)
                self._next_version = live + 1
            committed = self._committed.version if self._committed else 0
            self._tx.send([rid], {"op": "welcome", "session": self.session, "pid": os.getpid(),
                                  "version": committed, "delta": self._delta is not None})
            log.info("receiver %s joined %s (live version %d)", rid, self.endpoint, live)
            if self._committed is not None:
                self._catch_up(rid, self._committed)
            self._cond.notify_all()

    def on_message(self, rid: str, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if self._delta is not None:
            self._delta.on_message(rid, msg)  # resync requests; frees resync buffers
        with self._lock:
            rec = self._versions.get(msg.get("version", -1))
            if op == "staged" and rec is not None:
                if rid in rec.catchup:
                    rec.catchup.pop(rid)
                    if rec.state == "committed":
                        self._tx.send([rid], {"op": "commit", "version": rec.version})
                else:
                    rec.staged.add(rid)
            elif op == "nack" and rec is not None:
                log.warning("receiver %s rejected version %d: %s: %s", rid, rec.version, msg["error"],
                            msg["message"][:500])
                if rid in rec.catchup:
                    rec.catchup.pop(rid)
                else:
                    rec.nacks[rid] = msg
            elif op == "release" and rec is not None:
                rec.holders.discard(rid)
                self._maybe_recycle(rec)
            self._cond.notify_all()

    def on_lost(self, rid: str, reason: str) -> None:
        with self._lock:
            self._receivers.pop(rid, None)
            metrics.RECEIVERS.labels(self._ep).set(len(self._receivers))
            if self._delta is not None:
                self._delta.on_lost(rid)
            for rec in list(self._versions.values()):
                rec.holders.discard(rid)
                rec.catchup.pop(rid, None)
                self._maybe_recycle(rec)
            self._cond.notify_all()
        log.info("receiver %s left %s: %s", rid, self.endpoint, reason)

    def on_tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            for rec in list(self._versions.values()):
                for rid, deadline in list(rec.catchup.items()):
                    if now > deadline:
                        log.warning("receiver %s did not stage catch-up version %d in time; disconnecting",
                                    rid, rec.version)
                        rec.catchup.pop(rid)
                        self._tx.drop(rid, "catch-up deadline missed")

    def _catch_up(self, rid: str, rec: _Version) -> None:
        """Send the committed version ``rec`` in full to one receiver (late join)."""
        if rec.end is None:
            return
        rec.holders.add(rid)
        rec.catchup[rid] = time.monotonic() + self.config.timeout_s
        self._tx.send([rid], {"op": "begin", "version": rec.version, "session": self.session,
                              "step": rec.step})
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
