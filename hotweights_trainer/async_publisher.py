"""Asynchronous publishing: snapshot the weights at the step boundary, push while the next step trains.

::

    apub = AsyncPublisher(WeightPublisher("shm://policy"))
    for step in range(steps):
        train_step()
        apub.submit(model, step=step)   # copies the weights into reused buffers, queues the push
    apub.close()                        # waits for queued pushes, then stops the thread

``submit`` copies every tensor (cast to ``send_dtype`` on the way, so the copy is no larger than
what is sent) into a snapshot buffer that is reused from push to push, and hands it to a background
thread that runs an ordinary :meth:`WeightPublisher.publish`. A version therefore always holds the
weights of exactly one step boundary, whatever the training thread does to the live parameters.

``max_staleness`` pushes may be queued or running at once (one snapshot buffer each). At a boundary
where that many are still in flight, ``staleness_policy`` decides: ``wait`` blocks until one
finishes (bounded by ``2 * timeout_s``: one push is itself bounded by ``timeout_s`` of waiting for
receivers), ``skip`` drops this boundary's version entirely; its snapshot is never taken, so nothing
of it is ever sent. Version numbers are assigned when a push starts, so skipped boundaries leave no
holes.

A push that fails in the background is reported to the training thread at the next ``submit`` (or
``flush`` / ``close``), following ``on_error``: ``raise`` raises it there, ``warn`` logs it and
training goes on. Exceptions that are not :class:`HotweightsError` (bugs) are always raised.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch

from . import metrics
from .config import SyncConfig
from .errors import ClosedError, HotweightsError, SyncTimeoutError
from .peft_sync import PeftItems, prepare
from .publisher import PublishResult, WeightPublisher
from .source import FLUSH, module_tensors, unwrap_model
from .wire.packer import wire_tensor

log = logging.getLogger(__name__)


@dataclass
class _Snapshot:
    """Reused host buffers for one queued push, keyed by tensor name."""

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def fill(self, source: Any, send_dtype: Optional[torch.dtype]) -> list[tuple[str, torch.Tensor]]:
        items = []
        with torch.no_grad():
            for name, tensor in _raw_items(source):
                _, dtype = wire_tensor(tensor, send_dtype)
                buf = self.buffers.get(name)
                if buf is None or buf.shape != tensor.shape or buf.dtype != dtype:
                    buf = self.buffers[name] = torch.empty(tensor.shape, dtype=dtype)
                buf.copy_(tensor.detach())  # the cast and the device-to-host copy, in one pass
                items.append((name, buf))
        return items


@dataclass
class _Job:
    items: list[tuple[str, torch.Tensor]]
    step: Optional[int]
    snapshot: _Snapshot


class AsyncPublisher:
    """Runs the pushes of a :class:`WeightPublisher` on a background thread (see the module doc)."""

    def __init__(self, publisher: WeightPublisher, *, config: Optional[SyncConfig] = None):
        self.publisher = publisher
        self.config = config if config is not None else publisher.config
        self._ep = str(publisher.endpoint)
        self._free = [_Snapshot() for _ in range(self.config.max_staleness)]
        self._queue: collections.deque[_Job] = collections.deque()
        self._inflight = 0
        self._cond = threading.Condition()
        self._pending_errors: collections.deque[BaseException] = collections.deque()
        self._closed = False
        self.results: list[PublishResult] = []
        """Every finished push, in order."""
        self.errors: list[BaseException] = []
        """Every failed push, in order (also those only logged under on_error=warn)."""
        self.skipped_steps: list[Optional[int]] = []
        """Steps whose version was skipped by staleness_policy=skip."""
        self.last_submitted_step: Optional[int] = None
        self._thread = threading.Thread(target=self._run, name=f"hotweights-async-{self._ep}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- training thread
    def submit(self, source: Any, *, step: Optional[int] = None, force: bool = False) -> bool:
        """Snapshot ``source`` and queue its push; False when this boundary's version was skipped.

        ``force`` waits for a free slot even under ``staleness_policy="skip"`` (e.g. for the final
        weights). Raises a background push's error first, following ``on_error``.
        """
        self._report_errors()
        t0 = time.perf_counter()
        with self._cond:
            if self._closed:
                raise ClosedError(f"asynchronous publisher on {self._ep} is closed")
            if self._inflight >= self.config.max_staleness:
                if self.config.staleness_policy == "skip" and not force:
                    self.skipped_steps.append(step)
                    metrics.ASYNC_SKIPPED.labels(self._ep).inc()
                    log.debug("step %s: %d push(es) still in flight, version skipped", step, self._inflight)
                    return False
                self._wait_locked(lambda: self._inflight < self.config.max_staleness, "a free push slot")
            snapshot = self._free.pop()
            self._inflight += 1
            metrics.ASYNC_INFLIGHT.labels(self._ep).set(self._inflight)
        try:
            # A PEFT model is snapshotted in its peft_mode form, and the form travels with the items.
            form, source = prepare(source, self.config.peft_mode)
            items = PeftItems(snapshot.fill(source, self.config.torch_send_dtype), form)
        except BaseException:
            with self._cond:
                self._free.append(snapshot)
                self._inflight -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._queue.append(_Job(items, step, snapshot))
            self.last_submitted_step = step
            self._cond.notify_all()
        metrics.ASYNC_WAIT_SECONDS.labels(self._ep).observe(time.perf_counter() - t0)
        return True

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every queued push finished, then report background errors (``on_error``)."""
        with self._cond:
            self._wait_locked(lambda: self._inflight == 0, "queued pushes to finish", timeout)
        self._report_errors()

    def close(self) -> None:
        """Finish queued pushes, stop the thread; does not close the publisher. Idempotent."""
        with self._cond:
            if self._closed:
                return
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(self.config.timeout_s)

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    @property
    def last_result(self) -> Optional[PublishResult]:
        with self._cond:
            return self.results[-1] if self.results else None

    def __enter__(self) -> "AsyncPublisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers
    def _wait_locked(self, ready: Any, what: str, timeout: Optional[float] = None) -> None:
        limit = 2 * self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncTimeoutError(f"asynchronous publisher on {self._ep}: no {what} within {limit:.1f}s "
                                       f"({self._inflight} push(es) in flight)")
            self._cond.wait(min(left, 0.5))

    def _report_errors(self) -> None:
        with self._cond:
            errors = list(self._pending_errors)
            self._pending_errors.clear()
        for exc in errors:
            if not isinstance(exc, HotweightsError) or self.config.on_error == "raise":
                raise exc
            log.warning("background weight push failed (on_error=warn, training continues): %s", exc)

    # ---------------------------------------------------------------- background thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
            try:
                result = self.publisher.publish(job.items, step=job.step)
                with self._cond:
                    self.results.append(result)
            except Exception as exc:  # noqa: BLE001 - any failure must reach the training thread
                log.info("background push of step %s failed: %s", job.step, exc)
                with self._cond:
                    self.errors.append(exc)
                    self._pending_errors.append(exc)
            finally:
                with self._cond:
                    self._free.append(job.snapshot)
                    self._inflight -= 1
                    metrics.ASYNC_INFLIGHT.labels(self._ep).set(self._inflight)
                    self._cond.notify_all()


def _raw_items(source: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs with their original names (the publisher normalises them later)."""
    if isinstance(source, torch.nn.Module):
        return module_tensors(unwrap_model(source))
    if isinstance(source, Mapping):
        return source.items()
    if isinstance(source, (str, bytes)) or not hasattr(source, "__iter__"):
        raise HotweightsError(
            f"cannot publish a {type(source).__name__}: pass an nn.Module, a Mapping[str, Tensor] "
            "or an iterable of (name, tensor)")
    return _checked(source)


def _checked(items: Iterable[Any]) -> Iterable[tuple[str, torch.Tensor]]:
    for item in items:
        if item is FLUSH:
            continue  # the snapshot copies each tensor as it reads it: a group may be released now
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise HotweightsError(f"source yielded {type(item).__name__}, expected (name, tensor)") from None
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise HotweightsError(
                f"source yielded ({type(name).__name__}, {type(tensor).__name__}), expected (str, Tensor)")
        yield name, tensor


__all__ = ["AsyncPublisher"]
