"""Inference side: stage -> verify -> commit -> apply.

Buckets are verified (header and payload checksums, manifest against the model) as they arrive, on
the transport's thread. A version becomes *pending* only when the publisher commits it, which it
does only after every receiver staged it. The model changes only when its owner calls :meth:`poll`
or :meth:`wait_for_version`, in the owner's thread, so serving code decides when the (short) pause
happens and never sees a half-applied model. A version that is aborted, superseded or cut off by a
lost publisher is discarded whole.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

from . import metrics
from .config import SyncConfig
from .control.heartbeat import Heartbeat
from .delta.engine import ReceiverDelta
from .errors import (AuthError, ClosedError, EngineError, HotweightsError, ManifestMismatchError,
                     PeerLostError, SyncTimeoutError, WireFormatError)
from .kv import KVPolicy, KVRegistry, attach_kv_policy
from .naming import NameMap
from .peft_sync import adapter_targets, has_peft_layers, receiver_problem
from .staging import StagedVersion, apply_to_targets, build_targets, make_resolver, required_groups
from .transports import create_receiver_transport, parse_endpoint
from .gpu.bucket import decode_received

log = logging.getLogger(__name__)

ApplyFn = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]
_ids = itertools.count(1)


class StagingObserver(Protocol):
    """Sees every step of the versions a receiver stages; a host relay (:mod:`.relay`) is one.

    Every method runs on the transport's thread with the receiver's lock held: it must only record or
    queue, never block or call back into the receiver.
    """

    def on_begin(self, version: int, session: int, step: Optional[int]) -> None: ...

    def on_bucket(self, version: int, index: int, header: Any, data: memoryview) -> None:
        """A bucket passed every check; ``data`` stays valid until the version is released."""

    def on_end(self, version: int, n_buckets: int) -> bool:
        """Every bucket verified. True: the observer answers ``staged`` itself, later, through
        :meth:`WeightReceiver.confirm_staged` (or ``nack`` through :meth:`WeightReceiver.reject_staged`)."""

    def on_decision(self, version: int, committed: bool, reason: str) -> None: ...

    def heartbeat_fields(self) -> dict[str, Any]:
        """Extra fields for each heartbeat (a relay's report of the receivers behind it)."""


class WeightReceiver:
    """Follows a publisher and applies each committed version whole.

    ``model``: an ``nn.Module`` updated in place (``param.data.copy_`` under ``no_grad``; references
    the serving code holds stay valid). ``apply``: a callable taking an iterable of ``(name, tensor)``
    (the shape of vLLM's ``model.load_weights``); the tensors are read-only views valid only during
    the call. With both, ``model`` is used to check the manifest and ``apply`` to load.
    ``kv_policy`` (default ``config.kv_policy``): what happens to the KV caches registered in
    ``self.kv`` (a :class:`~hotweights_trainer.kv.KVRegistry`, or ``kv_registry``) at each version.
    ``require_complete``: reject (nack) a version that leaves out any tensor of ``model``, for loaders
    that cannot take part of a model (vLLM's fused layers); when ``model`` is a PeftModel, any tensor
    of its adapter form (the adapter writer of the vLLM backend needs the whole adapter).
    A PeftModel as ``model`` next to ``apply`` takes adapter-form versions: the model (it may live on
    the ``meta`` device) checks names and shapes, ``apply`` gets the tensors under PeftModel names.
    """

    def __init__(self, endpoint: str, *, model: Optional[torch.nn.Module] = None,
                 apply: Optional[ApplyFn] = None, config: Optional[SyncConfig] = None,
                 name_map: NameMap = None, kv_policy: "str | KVPolicy | None" = None,
                 kv_registry: Optional[KVRegistry] = None, require_complete: bool = False,
                 observer: Optional[StagingObserver] = None):
        if model is None and apply is None:
            raise HotweightsError("WeightReceiver needs a model to update or an apply callable")
        self.config = config if config is not None else SyncConfig.from_env()
        self.endpoint = parse_endpoint(endpoint)
        self.model = model
        self._apply_fn = apply
        self._observer = observer
        self.name_map = name_map
        targets = build_targets(model) if model is not None else None
        # Whether adapter-mode (PeftModel names) or merged-mode PEFT versions fit this model.
        self._holds_peft = model is not None and has_peft_layers(model)
        self._resolve = make_resolver(targets, name_map)
        self._check = targets is not None
        self._required: list[list[str]] = []
        if require_complete and targets is not None:
            # A PeftModel takes adapter-form versions only (receiver_problem), and those carry its
            # adapter tensors alone: these are what must be complete, not the frozen base weights.
            self._required = required_groups(adapter_targets(model, targets) if self._holds_peft else targets)
        self.receiver_id = f"{socket.gethostname()}:{os.getpid()}:{next(_ids)}"
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._apply_lock = threading.Lock()
        self._staging: Optional[StagedVersion] = None
        self._staging_error: Optional[HotweightsError] = None
        self._pending: Optional[StagedVersion] = None
        # (version it belongs to, or None for the connection itself; the error)
        self._errors: collections.deque[tuple[Optional[int], HotweightsError]] = collections.deque(maxlen=32)
        self._live_version = 0
        self._live_session: Optional[int] = None
        self._live_step: Optional[int] = None
        self._session: Optional[int] = None
        self._ever_connected = False
        self._lost_reason: Optional[str] = None
        self._closed = False
        self._apply_hooks: list[Callable[["WeightReceiver", int], None]] = []
        self.kv = attach_kv_policy(self, kv_policy, kv_registry)  # first hook: caches follow each version
        self.last_apply_seconds = 0.0
        self.last_apply_bytes = 0
        self.versions_applied = 0
        self._announced = 0
        self._ep = str(self.endpoint)
        metrics.start_exporter(self.config.metrics_port, self.config.metrics_host)
        self._delta = ReceiverDelta(self.config, self._ep)
        self._handles_fetched = metrics.HANDLES_FETCHED.labels(self._ep)
        self._tx = create_receiver_transport(self.endpoint, self.config)
        self._tx.start(self, self._hello)
        self._heartbeat = Heartbeat(self._tx.send, lambda: self._tx.connected, lambda: self._live_version,
                                    self.config.heartbeat_interval_s, self.receiver_id,
                                    extra=observer.heartbeat_fields if observer is not None else None)

    # ---------------------------------------------------------------- public API
    @property
    def version(self) -> int:
        """The version now live in the model (0 before the first)."""
        return self._live_version

    @property
    def step(self) -> Optional[int]:
        """The trainer step the live version was published at, when the publisher gave one."""
        return self._live_step

    @property
    def connected(self) -> bool:
        return self._tx.connected

    def add_apply_hook(self, fn: Callable[["WeightReceiver", int], None]) -> None:
        """Call ``fn(receiver, version)`` after each version is applied, inside the same pause."""
        self._apply_hooks.append(fn)

    def poll(self) -> Optional[int]:
        """Apply the newest committed version if one is waiting; never blocks on the network.

        Returns the version applied, or None. Raises the oldest error not yet reported (a version
        this receiver rejected), once.
        """
        self._raise_pending_error()
        with self._lock:
            staged, self._pending = self._pending, None
        if staged is None:
            return None
        return self.apply_taken(staged)

    def wait_for_version(self, min_version: int = 1, timeout: Optional[float] = None) -> int:
        """Block until a committed version >= ``min_version`` is applied; returns the live version.

        Raises :class:`SyncTimeoutError` after ``timeout`` (default ``config.timeout_s``) seconds, or
        :class:`PeerLostError` when the publisher went away and did not come back in that time.
        """
        limit = self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            if self._closed:
                raise ClosedError(f"receiver on {self.endpoint} is closed")
            self.poll()
            if self._live_version >= min_version:
                return self._live_version
            with self._cond:
                if self._pending is None and not self._errors:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.5))
        self._raise_timeout(min_version, limit)

    def _raise_timeout(self, min_version: int, limit: float) -> None:
        if self._lost_reason is not None and not self._tx.connected:
            raise PeerLostError(f"publisher of {self.endpoint} went away ({self._lost_reason}) and did not "
                                f"come back within {limit:.1f}s; live version is {self._live_version}")
        state = "connected" if self._tx.connected else "never connected" if not self._ever_connected else "not connected"
        raise SyncTimeoutError(f"no version >= {min_version} from {self.endpoint} within {limit:.1f}s "
                               f"({state}; live version {self._live_version})")

    # ---------------------------------------------------------------- two-step apply (engines with several ranks)
    @property
    def pending_version(self) -> Optional[int]:
        """The committed version waiting for :meth:`poll`, or None."""
        with self._lock:
            return self._pending.version if self._pending is not None else None

    def wait_for_pending(self, min_version: int, timeout: Optional[float] = None) -> int:
        """Block until a committed version >= ``min_version`` is staged and waiting, without applying it.

        Returns that version, or the live version when it already is >= ``min_version`` and nothing
        newer waits. Raises the error of a version this receiver rejected, :class:`SyncTimeoutError`
        after ``timeout`` (default ``config.timeout_s``), or :class:`PeerLostError`, like
        :meth:`wait_for_version`.
        """
        limit = self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            with self._cond:
                if self._closed:
                    raise ClosedError(f"receiver on {self.endpoint} is closed")
                # A version it rejected but a newer one superseded no longer matters here: the trainer's
                # publish() already raised it.
                if self._pending is not None and self._pending.version >= min_version:
                    self._drop_errors_before(self._pending.version)
                    return self._pending.version
                if self._pending is None and self._live_version >= min_version:
                    self._drop_errors_before(self._live_version + 1)
                    return self._live_version
            self._raise_pending_error(min_version)
            with self._cond:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not self._errors:
                    self._cond.wait(min(left, 0.5))
        self._raise_timeout(min_version, limit)

    def take_pending(self, version: int) -> Optional[StagedVersion]:
        """Take the waiting version if it is exactly ``version``: a newer commit can no longer replace it.

        Hand it back with :meth:`apply_taken` or :meth:`return_taken`. Returns None when another
        version (or none) is waiting.
        """
        with self._lock:
            if self._pending is None or self._pending.version != version:
                return None
            staged, self._pending = self._pending, None
            return staged

    def apply_taken(self, staged: StagedVersion) -> int:
        """Apply a version taken with :meth:`take_pending`; returns its number."""
        try:
            self._apply(staged)
        finally:
            self._release(staged)
        return staged.version

    def return_taken(self, staged: StagedVersion) -> None:
        """Give back a version taken with :meth:`take_pending` unapplied (released if a newer one waits)."""
        with self._lock:
            if self._pending is None and not self._closed:
                self._pending = staged
                self._cond.notify_all()
                return
        self._release(staged)

    def confirm_staged(self, version: int) -> bool:
        """Send the ``staged`` an observer deferred (its ``on_end`` returned True); False when
        ``version`` is no longer the one staging (aborted, superseded, publisher lost)."""
        with self._lock:
            st = self._staging
            if st is None or st.version != version or not st.end_seen or self._staging_error is not None:
                return False
            self._staged(st)
            return True

    def reject_staged(self, version: int, err: HotweightsError) -> None:
        """Answer ``nack`` with ``err`` for a version whose ``staged`` an observer deferred."""
        with self._lock:
            st = self._staging
            if st is not None and st.version == version:
                self._reject(st, err)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._staging = None
            self._pending = None
            self._cond.notify_all()
        self._heartbeat.stop()
        self._tx.close()

    def __enter__(self) -> "WeightReceiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- apply
    def _apply(self, staged: StagedVersion) -> None:
        with self._apply_lock:
            t0 = time.perf_counter()
            if self._apply_fn is not None:
                self._apply_fn(staged.iter_tensors())
                nbytes = staged.nbytes
            else:
                nbytes = apply_to_targets(staged, self._resolve)
            for hook in self._apply_hooks:
                hook(self, staged.version)
            dt = time.perf_counter() - t0
            if self._live_session is not None and staged.session != self._live_session:
                log.warning("new publisher session on %s: version %d -> %d", self.endpoint,
                            self._live_version, staged.version)
            self._live_version = staged.version
            self._live_session = staged.session
            self._live_step = staged.step
            self.last_apply_seconds = dt
            self.last_apply_bytes = nbytes
            self.versions_applied += 1
        metrics.SYNC_SECONDS.labels(self._ep, "apply").observe(dt)
        metrics.RECEIVER_VERSION.labels(self._ep, self.receiver_id).set(staged.version)
        metrics.VERSION_LAG.labels(self._ep, self.receiver_id).set(max(self._announced - staged.version, 0))
        log.debug("applied version %d (%.1f MB in %.2f ms)", staged.version, nbytes / 1e6, dt * 1e3)

    def _release(self, staged: StagedVersion) -> None:
        staged.buckets.clear()  # drop our views of the publisher's buffers before saying so
        self._delta.on_release(staged)  # private tensors go back to the pool (the shadow keeps its own)
        try:
            self._tx.send({"op": "release", "version": staged.version})
        except HotweightsError:
            pass  # publisher gone: nothing to release to, its buffers went with it

    def _raise_pending_error(self, min_version: int = 0) -> None:
        """Raise the oldest unreported error; errors of versions below ``min_version`` are dropped."""
        with self._lock:
            self._drop_errors_before(min_version)
            err = self._errors.popleft()[1] if self._errors else None
        if err is not None:
            raise err

    def _drop_errors_before(self, version: int) -> None:
        while self._errors and self._errors[0][0] is not None and self._errors[0][0] < version:
            dropped_version, err = self._errors.popleft()
            log.debug("not reporting the rejection of version %d again (a newer version is asked for): %s",
                      dropped_version, err)

    def _record_error(self, err: HotweightsError, version: Optional[int] = None) -> None:
        metrics.ERRORS.labels(self._ep, type(err).__name__).inc()
        self._errors.append((version, err))
        self._cond.notify_all()

    # ---------------------------------------------------------------- transport callbacks
    def on_connected(self, info: dict[str, Any]) -> None:
        with self._lock:
            self._ever_connected = True
            self._lost_reason = None
            self._cond.notify_all()

    def on_message(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        with self._lock:
            if self._closed:
                return
            if op == "welcome":
                self._session = msg["session"]
                self._delta.on_welcome(msg)
            elif op == "refused":
                # A wrong or missing token does not fix itself: stop reconnecting and report it.
                log.error("publisher of %s refused this receiver: %s", self.endpoint, msg["reason"])
                self._record_error(AuthError(f"publisher of {self.endpoint} refused this receiver: "
                                             f"{msg['reason']}"))
                self._lost_reason = f"refused: {msg['reason']}"
                threading.Thread(target=self._tx.close, daemon=True).start()
            elif op == "begin":
                self._begin(msg)
            elif op == "end":
                self._end(msg)
            elif op == "commit":
                self._commit(msg["version"])
            elif op == "abort":
                st = self._staging
                if st is not None and st.version == msg["version"]:
                    log.info("version %d aborted by the publisher: %s", st.version, msg["reason"][:300])
                    self._discard()
                self._unannounce(msg["version"])
                self._observe_decision(msg["version"], False, f"aborted upstream: {msg['reason'][:300]}")

    def on_bucket(self, version: int, index: int, data: memoryview) -> None:
        with self._lock:
            st = self._staging
            if st is None or st.version != version or self._staging_error is not None:
                return
            self._handles_fetched.inc()
            try:
                header = decode_received(data, max_header_bytes=self.config.max_message_bytes)
                if self._delta.is_resync(header):
                    self._delta.on_resync_bucket(st, header, data)
                    if st.end_seen and not st.needs:
                        self._staged(st)
                    return
                st.add_bucket(header, data, self._resolve if self._check else None)
                self._delta.on_bucket(st, header, data)
                if self._observer is not None:
                    self._observer.on_bucket(version, index, header, data)
            except HotweightsError as exc:
                self._staging_error = exc
                if st.end_seen:
                    self._reject(st, exc)

    def on_bucket_failed(self, version: int, index: int, error: Exception) -> None:
        with self._lock:
            st = self._staging
            if st is not None and st.version == version and self._staging_error is None:
                self._staging_error = WireFormatError(f"bucket {index} of version {version}: {error}")

    def on_lost(self, reason: str) -> None:
        with self._lock:
            self._lost_reason = reason
            if self._staging is not None:
                log.info("publisher lost during version %d; discarding it (live version stays %d)",
                         self._staging.version, self._live_version)
                self._observe_decision(self._staging.version, False, f"publisher lost: {reason}")
                self._staging = None
                self._staging_error = None
            self._cond.notify_all()

    def on_error(self, error: BaseException, where: str) -> None:
        """Code on a transport thread raised (a bug, not the publisher's fault): the version being
        staged fails at once, with a nack so the publisher does not wait out its deadline, and
        ``poll``/``wait_for_version`` raise an :class:`EngineError` whose ``__cause__`` is ``error``."""
        with self._lock:
            st = self._staging
            about = f"version {st.version}: " if st is not None else ""
            err = EngineError(f"{about}receiver on {self.endpoint} failed in {where}: "
                              f"{type(error).__name__}: {error}")
            err.__cause__ = error
            log.error("%s", err, exc_info=error)
            if st is not None:
                self._reject(st, err)
            else:
                self._record_error(err)

    # ---------------------------------------------------------------- protocol steps (lock held)
    def _hello(self) -> dict[str, Any]:
        hello = {"op": "hello", "receiver_id": self.receiver_id, "pid": os.getpid(),
                 "live_version": self._live_version, "host": socket.gethostname(),
                 **self._delta.hello_fields()}
        if self.config.coord_token is not None:
            hello["token"] = self.config.coord_token
        if self._observer is not None:
            hello.update(self._observer.heartbeat_fields())  # a relay says so in its hello
        return hello

    def _begin(self, msg: dict[str, Any]) -> None:
        if self._staging is not None:
            self._discard()
        step = msg.get("step")
        self._announced = max(self._announced, msg["version"])
        metrics.VERSION_LAG.labels(self._ep, self.receiver_id).set(self._announced - self._live_version)
        self._staging = StagedVersion(msg["version"], msg["session"], step if isinstance(step, int) else None)
        # Refused before any bucket is staged; the nack goes out with "end" (see _end).
        self._staging_error = receiver_problem(msg.get("peft"), self.model, self._holds_peft)
        if self._observer is not None:
            self._observer.on_begin(msg["version"], msg["session"], self._staging.step)

    def _unannounce(self, version: int) -> None:
        """An aborted version never goes live, so the lag stops counting it."""
        if version == self._announced:
            pending = self._pending.version if self._pending is not None else 0
            self._announced = max(self._live_version, pending)
            metrics.VERSION_LAG.labels(self._ep, self.receiver_id).set(self._announced - self._live_version)

    def _end(self, msg: dict[str, Any]) -> None:
        st = self._staging
        if st is None or st.version != msg["version"]:
            return
        err = self._staging_error
        if err is None:
            if self._required:
                sent = {self._resolve(wire)[0] for wire in st.shapes}
                for names in self._required:
                    if sent.isdisjoint(names):
                        st.problems[names[0]] = "missing from the version (this receiver needs every tensor)"
            try:
                st.finalize(msg["n_buckets"], msg["digest"])
            except HotweightsError as exc:
                err = exc
        if err is not None:
            self._reject(st, err)
            return
        st.end_seen = True
        request = self._delta.resync_request(st)
        if request is not None:
            self._send(request)  # "staged" follows once the dense copies arrived and matched
            return
        if self._observer is not None and self._observer.on_end(st.version, msg["n_buckets"]):
            return  # the observer sends "staged" (confirm_staged) once what it feeds has staged
        self._staged(st)

    def _staged(self, st: StagedVersion) -> None:
        self._delta.on_staged(st)
        # The digest it verified: the coordinator checks it against the one the publisher sealed.
        self._send({"op": "staged", "version": st.version, "digest": st.manifest.digest()})

    def _reject(self, st: StagedVersion, err: HotweightsError) -> None:
        nack: dict[str, Any] = {"op": "nack", "version": st.version, "error": type(err).__name__,
                                "message": str(err)[:4000]}
        if isinstance(err, ManifestMismatchError):
            nack["problems"] = err.problems
        log.error("rejecting version %d: %s", st.version, err)
        self._record_error(err, st.version)
        self._observe_decision(st.version, False, f"rejected: {type(err).__name__}: {err}")
        self._discard()
        self._send(nack)

    def _commit(self, version: int) -> None:
        st = self._staging
        if st is None or st.version != version or not st.complete or st.needs:
            return
        self._staging = None
        self._delta.on_commit(st)  # the shadow follows commits, not applies
        self._observe_decision(version, True, "")
        if st.session == self._live_session and version <= self._live_version:
            self._release(st)  # a catch-up of what we already run
        else:
            if self._pending is not None:
                self._release(self._pending)  # superseded before it was applied
            self._pending = st
            self._cond.notify_all()
        # Only now, with the version pending: the publisher's publish() returns after this ack, so
        # a poll() that follows it in any thread or process finds the version here.
        self._send({"op": "committed", "version": version})

    def _observe_decision(self, version: int, committed: bool, reason: str) -> None:
        if self._observer is not None:
            self._observer.on_decision(version, committed, reason)

    def _discard(self) -> None:
        st, self._staging = self._staging, None
        self._staging_error = None
        if st is not None:
            self._release(st)

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._tx.send(msg)
        except HotweightsError as exc:
            log.info("could not send %r to the publisher: %s", msg["op"], exc)
