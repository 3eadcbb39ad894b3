"""Collective plumbing of the ``torch`` transport, the same on both sides of a broadcast group.

Host buffers as uint8 tensors, one chunk's broadcast from rank 0 and completion callbacks that feed
an :class:`~.delivery.EventPending`, the chunk stager through device memory for nccl/ccl groups,
retiring a group (off the caller's thread), a group a receiver is still joining, the broadcast
autotune every member runs with the same candidates, and the checks both sides start with.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import EndpointError, TransportUnavailableError
from . import tcp
from .buffers import HostBuffer
from .delivery import EventPending
from .endpoint import Endpoint

log = logging.getLogger("hotweights_trainer.transports.torchdist")


def host_tensor(buf: HostBuffer):
    """A uint8 tensor over a host buffer's memory (cached on the buffer)."""
    if buf.tag is None:
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            buf.tag = torch.frombuffer(buf.mem, dtype=torch.uint8)
    return buf.tag


def broadcast(pg: Any, tensor: Any) -> Any:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return pg.broadcast([tensor], opts)


def watch(work: Any, pending: EventPending) -> None:
    """Finish one part of ``pending`` when ``work`` completes (on the backend's thread)."""

    def done(fut: Any) -> None:
        try:
            fut.value()
        except Exception as exc:  # noqa: BLE001 - the backend's error becomes the bucket's failure
            pending.finish(exc)
            return
        pending.finish()

    work.get_future().add_done_callback(done)


class DeviceStager:
    """Chunks through device memory for nccl/ccl groups (synchronous per chunk)."""

    def __init__(self, device: str, chunk: int):  # pragma: no cover - needs a GPU or XPU
        import torch

        self.device = device
        self.scratch = torch.empty(chunk, dtype=torch.uint8, device=device)

    def receive_into(self, pg: Any, dev: Any, host: Any, length: int, chunk: int) -> None:  # pragma: no cover
        """Receiver side: broadcast straight into ``dev`` and copy each chunk to ``host`` for verification."""
        for off, size in tcp.chunks(length, chunk):
            broadcast(pg, dev[off:off + size]).wait()
            host[off:off + size].copy_(dev[off:off + size])

    def run(self, pg: Any, host: Any, length: int, chunk: int, root: bool) -> None:  # pragma: no cover
        import torch

        if self.scratch.numel() < chunk:
            self.scratch = torch.empty(chunk, dtype=torch.uint8, device=self.device)
        for off, size in tcp.chunks(length, chunk):
            dev = self.scratch[:size]
            if root:
                dev.copy_(host[off:off + size])
            broadcast(pg, dev).wait()
            if not root:
                host[off:off + size].copy_(dev)


def require_torch_distributed() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise TransportUnavailableError("the torch transport needs torch.distributed, which this torch build lacks")


def check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.scheme != "tcp":
        raise EndpointError(f"the torch transport needs a tcp://HOST:PORT endpoint, got {endpoint}")


@dataclass
class BroadcastGroup:
    """One broadcast group: the publisher (rank 0) and exactly the receivers ``rids``, for one epoch."""

    epoch: int
    rids: tuple[str, ...]
    pg: Any
    backend: str
    broken: Optional[str] = None
    stager: Optional[DeviceStager] = None


class Forming:
    """A broadcast group a receiver is still joining, on a thread of its own.

    Joining waits in a rendezvous for every member; when one of them died after the publisher told
    it, that wait lasts the whole store timeout. On the control thread it would hold back every
    frame behind it -- buckets of other groups, aborts -- so the publisher's next version timed out
    on a healthy receiver. Buckets of the group being joined wait here instead, in arrival order,
    and start (or fail) when the joining thread calls :meth:`finish`.
    """

    def __init__(self, epoch: int, backend: str):
        self.epoch = epoch
        self.backend = backend
        self.cancelled = False  # an ``ungroup`` arrived first: retire the group as soon as it forms
        self._lock = threading.Lock()
        self._waiting: list[Callable[[Any, Optional[BaseException]], None]] = []
        self._done = False

    def defer(self, start: Callable[[Any, Optional[BaseException]], None]) -> bool:
        """Queue ``start(group, error)``; False when joining has finished (use the group directly)."""
        with self._lock:
            if self._done:
                return False
            self._waiting.append(start)
            return True

    def finish(self, group: Any, error: Optional[BaseException]) -> None:
        """Joining ended (``group`` or ``error``): start what waited, in order."""
        with self._lock:
            self._done = True
            waiting, self._waiting = self._waiting, []
            for start in waiting:
                start(group, error)


def retire_group(group: Any) -> None:
    """Abort ``group.pg`` and free it on a thread of its own; ``group.pg`` becomes None.

    Abort makes new work on the group fail at once, but it does not cancel a receive already
    waiting on a member that died: that one returns only at the group's timeout, and freeing a
    gloo group joins the worker thread stuck in it. Freed where the last reference happened to
    drop -- the control thread, on an ``ungroup`` or a lost member -- it held back every control
    message after it (the abort, the next version's buckets, heartbeats) for up to ``timeout_s``,
    and the publisher timed out on a healthy receiver. So the group's only reference moves to a
    short-lived thread, which may block as long as it likes.
    """
    pg, group.pg = group.pg, None
    if pg is None:
        return
    try:
        pg.abort()
    except Exception as exc:  # noqa: BLE001 - best effort teardown; the group is unusable anyway
        log.debug("aborting a process group failed: %s", exc)
    box = [pg]
    del pg  # the thread's box now holds the only reference
    thread = threading.Thread(target=_free, args=(box,), name="hotweights-pg-free", daemon=True)
    with _FREEING_LOCK:  # started under the lock, so wait_retired never joins a thread not yet started
        _FREEING.add(thread)
        thread.start()


_FREEING: set[threading.Thread] = set()
_FREEING_LOCK = threading.Lock()


def _free(box: list[Any]) -> None:
    box.clear()  # the last reference: may wait out a receive pending on a dead member
    with _FREEING_LOCK:
        _FREEING.discard(threading.current_thread())


def wait_retired(timeout_s: float) -> None:
    """Wait, up to ``timeout_s``, until every retired group is freed (transports call it on close).

    A process must not exit while a group is still being freed on another thread: the C++ runtime
    then aborts the process ("terminate called without an active exception").
    """
    deadline = time.monotonic() + timeout_s
    with _FREEING_LOCK:
        threads = list(_FREEING)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def run_autotune(pg: Any, spec: dict[str, Any], *, root: bool, stager: Optional[DeviceStager] = None) -> int:
    """Broadcast ``spec['mb']`` MiB in each candidate chunk size; returns the fastest chunk in bytes.

    Every member calls it with the same ``spec`` (the publisher sends it in ``tx/group``). Each
    candidate ends with an all-reduce so the root's clock covers the slowest receiver.
    """
    import torch

    total = int(spec["mb"]) << 20
    candidates = [int(c) << 20 for c in spec["chunks_mb"]]
    scratch = host_tensor(HostBuffer(total))
    token = torch.zeros(1)
    table = []
    for chunk in candidates:
        t0 = time.perf_counter()
        if stager is None:
            works = [broadcast(pg, scratch[off:off + size]) for off, size in tcp.chunks(total, chunk)]
            for w in works:
                w.wait()
        else:  # pragma: no cover - device backends
            stager.run(pg, scratch, total, chunk, root)
        pg.allreduce([token]).wait()
        dt = time.perf_counter() - t0
        table.append((chunk, dt))
    best = min(table, key=lambda r: r[1])[0]
    if root:
        lines = [f"  chunk {c >> 20:>5} MiB: {total / dt / 1e9:6.2f} GB/s{'  <- chosen' if c == best else ''}"
                 for c, dt in table]
        log.info("broadcast autotune over %d MiB:\n%s", total >> 20, "\n".join(lines))
    return best


__all__ = ["DeviceStager", "Forming", "broadcast", "host_tensor", "retire_group", "run_autotune",
           "wait_retired", "watch"]
