"""Reused device buffers: the publisher's exported bucket buffers and the receivers' staged buffers.

Allocating device memory per bucket would make every version pay allocator and IPC-mapping costs
(opening a CUDA IPC handle takes far longer than copying a bucket on the GPU), so buffers are kept and
reused, in the size classes of :func:`hotweights_trainer.transports.buffers.size_class`: full-size
buckets share one class, small ones (a version's last bucket) get their own.

:class:`DevicePool` (publisher) hands out :class:`DeviceBuffer` objects that keep their exports per
receiver, so a receiver maps each buffer once and reuses the mapping for every later version.
:class:`StagedPool` (receiver) lends plain tensors per version; ``release(version)`` returns them.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Optional

import torch

from ..transports.buffers import size_class

_ids = itertools.count(1)


class DeviceBuffer:
    """One exported bucket buffer of the publisher."""

    __slots__ = ("id", "tensor", "size", "exports", "header", "payload_len", "length")

    def __init__(self, tensor: torch.Tensor):
        self.id = next(_ids)
        self.tensor = tensor
        self.size = tensor.numel()
        self.exports: dict[str, dict[str, Any]] = {}  # receiver id -> its export of this buffer
        self.header = b""
        self.payload_len = 0
        self.length = 0


class DevicePool:
    """Free list of :class:`DeviceBuffer` by size; ``get`` reuses the smallest that fits."""

    def __init__(self, alloc: Callable[[int], torch.Tensor], bucket_bytes: int):
        self._alloc = alloc
        self.bucket_bytes = bucket_bytes
        self._free: list[DeviceBuffer] = []
        self.all: dict[int, DeviceBuffer] = {}
        self._lock = threading.Lock()
        self.created = 0

    def get(self, nbytes: int, usable: Callable[[DeviceBuffer], bool] = lambda b: True) -> DeviceBuffer:
        with self._lock:
            fits = [b for b in self._free if b.size >= nbytes and usable(b)]
            if fits:
                buf = min(fits, key=lambda b: b.size)
                self._free.remove(buf)
                return buf
        buf = DeviceBuffer(self._alloc(size_class(nbytes, self.bucket_bytes)))
        with self._lock:
            self.all[buf.id] = buf
            self.created += 1
        return buf

    def put(self, buf: DeviceBuffer) -> None:
        with self._lock:
            if buf.id in self.all and all(b is not buf for b in self._free):
                self._free.append(buf)

    def remove(self, buf: DeviceBuffer) -> bool:
        """Forget ``buf`` for good (its memory goes when the last reference does)."""
        with self._lock:
            if self.all.pop(buf.id, None) is None:
                return False
            self._free = [b for b in self._free if b is not buf]
            return True

    def clear(self) -> list[DeviceBuffer]:
        with self._lock:
            out = list(self.all.values())
            self.all.clear()
            self._free.clear()
            return out

    @property
    def in_use_bytes(self) -> int:
        with self._lock:
            free = {b.id for b in self._free}
            return sum(b.size for b in self.all.values() if b.id not in free)


class StagedPool:
    """Receiver buffers lent per version (a version's staged copy) and returned on release."""

    def __init__(self, alloc: Callable[[int], torch.Tensor], bucket_bytes: int, *, keep_versions: int = 4,
                 max_free_bytes: Optional[int] = None):
        self._alloc = alloc
        self.bucket_bytes = bucket_bytes
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._keep = keep_versions
        self._max_free = max_free_bytes
        self.created = 0

    def lend(self, version: int, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [t for t in self._free if t.numel() >= nbytes]
            t = min(fits, key=lambda x: x.numel()) if fits else None
            if t is not None:
                self._free = [x for x in self._free if x is not t]
        if t is None:
            t = self._alloc(size_class(nbytes, self.bucket_bytes))
            self.created += 1
        with self._lock:
            self._lent.setdefault(version, []).append(t)
            while len(self._lent) > self._keep:
                # A version nobody released (its publisher vanished): forget it; the engine's views
                # keep the memory alive for as long as they exist.
                self._lent.pop(min(self._lent))
        return t

    def release(self, version: int) -> None:
        with self._lock:
            for t in self._lent.pop(version, []):
                if self._max_free is None or sum(x.numel() for x in self._free) + t.numel() <= self._max_free:
                    self._free.append(t)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._lent.clear()

    @property
    def lent_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() for ts in self._lent.values() for t in ts)


__all__ = ["DeviceBuffer", "DevicePool", "StagedPool"]
