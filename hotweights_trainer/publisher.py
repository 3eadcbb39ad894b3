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

Threads: ``publish`` runs on the caller's thread and packs there; the records of every version and
receiver belong to the engine thread (:mod:`hotweights_trainer.engine`,
:mod:`hotweights_trainer.publish_engine`), to which ``publish`` hands each step and on which it
waits, always with a deadline.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
import weakref
from typing import Any, Callable, Optional

from . import metrics, peft_sync
from .config import SyncConfig
from .control.janitor import owner_tag
from .control.records import Committed
from .control.session import open_session
from .control.status_socket import StatusListener
from .delta.encoder import DeltaStats
from .delta.engine import make_publisher_delta
from .engine import EventLoop, engine_error
from .errors import ClosedError, ConfigError, HotweightsError, SyncTimeoutError, VersionAbortedError
from .naming import NameMap
from .publish_engine import PublisherEngine
from .publish_records import PublishResult, VersionRecord, abort_kind, nack_error
from .relay.forward import ForwardedVersion
from .source import iter_source
from .transports import create_publisher_transport, parse_endpoint
from .transports.base import PublisherTransport
from .wire.manifest import ManifestBuilder
from .wire.packer import plan_buckets

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 10.0  # how often a long wait for receivers says where it stands

_LIVE: "weakref.WeakSet[WeightPublisher]" = weakref.WeakSet()  # closed for you at interpreter exit


def _close_live_publishers() -> None:
    """A script that ends without ``close()`` (or a Trainer run with ``close_on_train_end=False``)
    still frees its shared memory and tells its receivers; each close is bounded by the publisher's
    ``exit_linger_s`` and ``timeout_s``."""
    for pub in list(_LIVE):
        try:
            if pub.config.exit_linger_s > 0:
                pub.config = pub.config.replace(linger_s=pub.config.exit_linger_s)
            pub.close(linger=pub.config.exit_linger_s > 0)
        except Exception as exc:  # noqa: BLE001 - at exit: log and go on closing the others
            log.warning("closing the publisher on %s at exit failed: %s", pub.endpoint, exc)


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
        self._publish_lock = threading.Lock()
        self._closed = False
        self._closing = False
        self._waited_for_receivers = False
        self._warned_no_receivers = False
        self.last_result: Optional[PublishResult] = None
        self._ep = str(self.endpoint)
        # Before the transport starts, so a taken metrics port leaves nothing half-started behind.
        metrics.start_exporter(self.config.metrics_port, self.config.metrics_host)
        self._tx: PublisherTransport = create_publisher_transport(self.endpoint, self.config)
        self._delta = None
        self._status: Optional[StatusListener] = None
        self._loop: Optional[EventLoop] = None
        try:
            # tcp://HOST:0: the transport bound a free port; what is keyed by the endpoint uses the real one.
            self.endpoint = self._tx.endpoint
            self._ep = str(self.endpoint)
            self._delta = make_publisher_delta(self.config, self._tx, session=self.session,
                                               endpoint_label=self._ep)
            # The status socket doubles as the "one publisher per endpoint on this host" check, before
            # the coordinator is claimed (a Redis-backed claim may wait for a lease).
            self._status = StatusListener(self._ep, self.status, self.config.timeout_s)
            self._session = open_session(self._ep, self.config)
            self._engine = PublisherEngine(endpoint=self.endpoint, config=self.config, tx=self._tx,
                                           session=self._session, delta=self._delta, owner=owner_tag(),
                                           session_id=self.session)
            self._engine.expired(self._session.claimed.expired)  # a dead predecessor's handles
            self._loop = EventLoop(self.endpoint.name or self._ep, self._engine.dispatch, self._engine.fail)
            self._loop.start()
            self._tx.start(self._loop.events)
        except BaseException:
            self._undo_init()
            raise
        _LIVE.add(self)
        # Registered again after this publisher's transport was imported: atexit runs handlers last in,
        # first out, so the close runs while the transport's own exit hooks have not yet run.
        atexit.unregister(_close_live_publishers)
        atexit.register(_close_live_publishers)
        log.info("publisher on %s (transport %s, bucket %d MiB, coordinator %s, epoch %d)", self.endpoint,
                 self._tx.name, self.config.bucket_mb, self._session.backend, self._session.epoch)

    def _undo_init(self) -> None:
        """A constructor that failed part way: free what it had started, the transport's bound port
        or mapped blocks included, now rather than at garbage collection."""
        self._closed = True  # __del__ then has nothing left to close
        if self._loop is not None:
            self._loop.stop(self.config.timeout_s)
        if self._delta is not None:
            self._delta.close()
        if self._status is not None:
            self._status.close()
        if getattr(self, "_session", None) is not None:
            self._session.close()
        self._tx.close()

    # ---------------------------------------------------------------- public API
    @property
    def version(self) -> int:
        """The last committed version (0 before the first; a resumed fleet's last one)."""
        return self._engine.committed_version

    @property
    def receivers(self) -> list[str]:
        return sorted(self._engine.connected)

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
        loop = self._live_loop()
        if len(self._engine.connected) < n:
            log.info("waiting for %d receiver(s) on %s (%d connected, deadline %.0fs)", n, self.endpoint,
                     len(self._engine.connected), limit)
        while True:
            gen = loop.generation
            have = len(self._engine.connected)
            if have >= n:
                return have
            if self._closed or self._closing:
                raise ClosedError(f"publisher on {self.endpoint} closed while waiting for receivers")
            now = time.monotonic()
            if now >= deadline:
                raise SyncTimeoutError(
                    f"only {have} of {n} receivers connected to {self.endpoint} "
                    f"within {limit:.1f}s; start the inference side with the same endpoint, or lower "
                    "HOTWEIGHTS_MIN_RECEIVERS / raise HOTWEIGHTS_RECEIVER_WAIT_S")
            if now >= next_note:
                log.warning("still waiting for receivers on %s: %d of %d connected after %.0fs "
                            "(deadline %.0fs)", self.endpoint, have, n, now - t0, limit)
                next_note = now + _PROGRESS_EVERY_S
            loop.wait_change(gen, min(deadline, next_note) - now)

    def publish(self, source: Any, *, step: Optional[int] = None) -> PublishResult:
        """Send one version and return once every connected receiver has committed it.

        Raises :class:`SyncTimeoutError` when a receiver does not stage within ``timeout_s``,
        :class:`ManifestMismatchError` / :class:`CorruptBucketError` when a receiver rejects the version,
        :class:`EngineError` (its ``__cause__`` the original) when the publisher's own engine code
        failed, in every case after aborting the version, so no receiver applies any of it.
        """
        with self._publish_lock:
            if self._closed or self._closing:
                raise ClosedError(f"publisher on {self.endpoint} is closed")
            # Read here, taken on the engine thread only when there is one: no hop per version.
            failure = self._call(self._engine.take_failure) if self._engine.failure is not None else None
            if failure is not None:  # an engine failure while no version was in flight
                metrics.ERRORS.labels(self._ep, type(failure).__name__).inc()
                raise failure
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
        if self._closed:
            return
        self._closing = True
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.notify()  # a first publish waiting for receivers gives up
        if linger and loop is not None:
            with self._publish_lock:  # a publish still running (another thread) finishes first
                self._linger()
        if self._closed:
            return
        self._closed = True
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.closed = True
        if loop is not None:
            loop.notify()
        if getattr(self, "_delta", None) is not None:
            self._delta.close()
        for part in ("_status", "_tx"):  # any of them may be missing if __init__ failed
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
        if loop is not None:
            loop.stop(self.config.timeout_s)  # after the transport: no event can follow
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()
        log.info("publisher on %s closed", self.endpoint)

    def status(self) -> dict[str, Any]:
        """The fleet as the coordinator sees it: receivers, live versions, lag, heartbeats, handles."""
        out = self._session.status()
        eng = self._engine
        out["publisher"] = {"endpoint": self._ep, "pid": os.getpid(), "transport": self._tx.name,
                            "coord_backend": self._session.backend, "epoch": self._session.epoch,
                            "refused_requests": eng.refused, "connected": sorted(eng.connected)}
        # Snapshots the engine replaces whole: a relay's heartbeat reports this status upstream and
        # must never wait for the engine.
        out["relays"] = dict(eng.relays)
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

    # ---------------------------------------------------------------- the engine
    def _live_loop(self) -> EventLoop:
        loop = self._loop
        if loop is None or self._closed:
            raise ClosedError(f"publisher on {self.endpoint} is closed")
        return loop

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the engine thread and wait for it; a bug in it becomes an EngineError."""
        try:
            return self._live_loop().call(fn, *args, timeout=self.config.timeout_s)
        except HotweightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in engine code: typed, with its cause
            raise engine_error(exc, f"running {getattr(fn, '__name__', fn)}", None) from exc

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
        if fwd is not None:  # a version upstream already ended must not take a version number here
            fwd.ensure_undecided()
        try:
            rec: VersionRecord = self._call(self._engine.begin, step,
                                            fwd.version if fwd is not None else None, peft_form)
        except HotweightsError as exc:
            metrics.ERRORS.labels(self._ep, type(exc).__name__).inc()
            raise
        version = rec.version
        manifest = ManifestBuilder()
        nbytes = 0
        t_pack = 0.0
        # FLUSH marks where a ZeRO-3 group ends: both planners pack what they hold before reading on.
        gather = _Timed(iter_source(source, self.name_map, flush_marks=True))
        delta = DeltaStats() if self._delta is not None else None
        loop = self._live_loop()
        unposted = None
        try:
            planner = (fwd.buckets() if fwd is not None
                       else self._delta.plan(gather, version, rec.quorum, delta) if self._delta is not None
                       else plan_buckets(gather, cfg.bucket_bytes, cfg.torch_send_dtype))
            posts = []
            n_buckets = 0
            for index, plan in enumerate(planner):
                tp = time.perf_counter()
                buf = unposted = self._tx.alloc(plan.total_len)
                buf.length = (plan.write_into(buf.mem, version=version, index=index, session=self.session)
                              if fwd is not None else
                              self._tx.pack(buf, plan, version=version, index=index, session=self.session))
                t_pack += time.perf_counter() - tp
                for entry in plan.entries:
                    manifest.add(entry)
                nbytes += buf.length
                # The engine posts while this thread packs the next bucket.
                posts.append(loop.submit(self._engine.post, rec, index, buf))
                unposted = None
                n_buckets += 1
                self._raise_failed_post(posts, version)
                if rec.error is not None:  # the engine failed meanwhile: stop packing now
                    raise rec.error
            for fut in posts:
                self._post_result(fut, version)
            t_sent = time.perf_counter()
            end = {"op": "end", "version": version, "n_buckets": n_buckets, "digest": manifest.digest(),
                   "n_tensors": len(manifest)}
            sealed = loop.submit(self._engine.seal, rec, end)  # its outcome is awaited with the decision
            self._wait_decision(rec, sealed)
            if fwd is not None:
                fwd.before_commit(version)  # upstream commits: so do we; upstream aborts: raises
            t_staged = time.perf_counter()
            committed, told = self._call(self._engine.commit, rec)
        except BaseException as exc:
            if unposted is not None:
                self._tx.recycle(unposted)  # packing it failed: the engine never saw it
            self._abort(rec, f"{type(exc).__name__}: {exc}", abort_kind(exc))
            metrics.ERRORS.labels(self._ep, type(exc).__name__).inc()
            raise
        self._wait_acks(rec, told)
        if not committed.ready and not committed.stragglers:
            self._warn_no_receivers(version)
        t1 = time.perf_counter()
        return self._record(rec, committed, nbytes, len(manifest), gather.seconds,
                            t_pack + (delta.encode_seconds if delta is not None else 0.0), delta,
                            (t0, t_sent, t_staged, t1))

    def _record(self, rec: VersionRecord, committed: Committed, nbytes: int, n_tensors: int, t_gather: float,
                t_encode: float, delta: Optional[DeltaStats],
                times: tuple[float, float, float, float]) -> PublishResult:
        t0, t_sent, t_staged, t1 = times
        dense_bytes = nbytes + (delta.dense_bytes - delta.payload_bytes if delta is not None else 0)
        result = PublishResult(
            version=rec.version, bytes_sent=nbytes, tensors_sent=n_tensors, seconds=t1 - t0,
            buckets=len(rec.buffers), receivers=len(committed.ready), dense_bytes=dense_bytes, step=rec.step,
            phases={"gather": t_gather, "encode": t_encode,
                    "transfer": max(t_sent - t0 - t_encode - t_gather, 0.0), "commit": t1 - t_sent,
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
        metrics.PUBLISHER_VERSION.labels(self._ep).set(rec.version)
        self.last_result = result
        log.debug("published version %d: %d tensors, %.1f MB, %d receivers, %.1f ms", rec.version,
                  result.tensors_sent, nbytes / 1e6, result.receivers, result.seconds * 1e3)
        return result

    def _raise_failed_post(self, posts: list, version: int) -> None:
        """A post that already failed ends the version now, not after packing the rest."""
        while posts and posts[0].done():
            self._post_result(posts.pop(0), version)

    def _post_result(self, fut: Any, version: int) -> None:
        self._step_result(fut, "posting a bucket", version)

    def _step_result(self, fut: Any, what: str, version: int) -> None:
        """The outcome of a step handed to the engine with ``submit``: a bug becomes an EngineError."""
        try:
            fut.result(self.config.timeout_s)
        except HotweightsError:
            raise
        except TimeoutError:
            if fut.done():
                raise engine_error(fut.exception(), what, version) from fut.exception()
            raise SyncTimeoutError(f"version {version}: {what} took longer than "
                                   f"{self.config.timeout_s:.1f}s") from None
        except Exception as exc:  # noqa: BLE001 - a bug in engine code: typed, with its cause
            raise engine_error(exc, what, version) from exc

    def _wait_decision(self, rec: VersionRecord, sealed: Any) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        loop = self._live_loop()
        while True:
            gen = loop.generation
            if self._closed:
                raise ClosedError("publisher closed while a version was in flight")
            if sealed.done():
                self._step_result(sealed, "sealing", rec.version)
            if rec.error is not None:
                raise rec.error
            lost = self._tx.delivery_error(rec.version)
            if lost is not None:
                raise lost
            d = rec.decision
            if d.decision == "commit" and sealed.done():
                return
            if d.decision == "abort" and d.kind != "deadline":
                if rec.nacks:
                    raise nack_error(rec.version, dict(rec.nacks))
                raise VersionAbortedError(rec.version, d.reason or "quorum not met")
            left = deadline - time.monotonic()
            if left <= 0 or d.decision == "abort":
                waiting = self._call(self._engine.drop_waiting, rec)
                raise SyncTimeoutError(
                    f"version {rec.version}: receiver(s) {', '.join(sorted(waiting))} did not stage "
                    f"within {self.config.timeout_s:.1f}s; version aborted and they were disconnected")
            loop.wait_change(gen, min(left, 0.5))

    def _abort(self, rec: VersionRecord, reason: str, kind: str) -> None:
        try:
            self._call(self._engine.abort, rec, reason, kind)
        except ClosedError:
            log.info("version %d not aborted on the engine: the publisher closed", rec.version)
        except HotweightsError as exc:
            log.warning("version %d could not be aborted cleanly: %s", rec.version, exc)

    def _wait_acks(self, rec: VersionRecord, told: list[str]) -> None:
        """Wait until every receiver told of the commit has it pending (its ``committed`` ack).

        The version is committed whatever happens here; a receiver that does not ack within
        ``timeout_s`` is disconnected (logged) and gets the version again as a late joiner.
        """
        loop = self._live_loop()

        def waiting() -> list[str]:
            connected = self._engine.connected
            return [r for r in told if r in connected and r not in rec.acked]

        left = loop.wait_for(lambda: not waiting() or self._closed, time.monotonic() + self.config.timeout_s)
        late = waiting()
        if not left and late and not self._closed:
            self._call(self._engine.drop_nonacking, rec, late)

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
        rec = self._engine.committed
        loop = self._loop
        if limit <= 0 or rec is None or loop is None:
            return
        need = max(1, self.config.min_receivers)
        t0 = time.monotonic()
        next_note = t0
        while True:
            gen = loop.generation
            missing = sorted(r for r in self._engine.connected if r not in rec.acked)
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
            loop.wait_change(gen, min(t0 + limit, next_note) - now)


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
