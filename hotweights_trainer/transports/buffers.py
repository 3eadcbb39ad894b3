"""Pre-faulted, reused host buffers for the transports that copy bytes (torch, mpi, ucx).

First touch of freshly mapped memory runs at a fraction of memcpy speed, so a transport that
allocated a new buffer per bucket would measure page faults, not the network. Buffers here are
anonymous mappings pre-faulted once (``MADV_POPULATE_WRITE``, or one write per page on older
kernels) and reused: full-size buckets share one size class, small ones (a version's last bucket, a
small model) get their own so a tiny model never maps whole buckets.

``HostBufferPool`` serves the publisher (``alloc``/``recycle``). ``ReceivePool`` serves receivers:
buffers are lent per version and come back when the receiver engine sends ``release`` for that
version -- but only when nothing may still write into them. A buffer whose transfer was abandoned is
never lent again, and it stays mapped until that transfer has stopped writing: a receive a transport
library still holds (UCX matches a posted receive to whatever the peer sends later) writes through a
raw pointer, so unmapping the buffer under it would crash the process.
"""

from __future__ import annotations

import logging
import mmap
import threading
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_ALIGN = 2 << 20


class HostBuffer:
    """One anonymous, pre-faulted mapping. ``mem`` is a writable memoryview of all of it."""

    __slots__ = ("size", "mm", "mem", "tag", "busy", "__weakref__")

    def __init__(self, size: int):
        self.size = size
        # Private, not shared: anonymous shared memory is tmpfs-backed (no huge pages, slower copies).
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if size >= _ALIGN and hasattr(mmap, "MADV_HUGEPAGE"):
            # Transparent huge pages: copies into and out of large buffers (CMA, memcpy) run markedly
            # faster without a TLB miss every 4 KiB. Advisory; a kernel without THP ignores it.
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, AttributeError):
            view = memoryview(self.mm)  # older kernels: one write per page
            for off in range(0, size, mmap.PAGESIZE):
                view[off] = 0
            view.release()
        self.mem = memoryview(self.mm)
        self.tag: object = None  # per-transport cache (e.g. a torch tensor over the same memory)
        self.busy: Optional[Callable[[], bool]] = None  # "a transfer may still write/read me"


def numpy_view(buf: HostBuffer) -> Any:
    """A uint8 numpy array over ``buf`` (cached in ``buf.tag``), for libraries that send from arrays."""
    if buf.tag is None:
        import numpy as np

        buf.tag = np.frombuffer(buf.mem, dtype=np.uint8)
    return buf.tag


def size_class(nbytes: int, bucket_bytes: int) -> int:
    """The capacity a buffer for ``nbytes`` gets (full-size buckets are interchangeable)."""
    full = bucket_bytes + (1 << 20)
    size = full if full >= nbytes >= bucket_bytes // 2 else nbytes
    return max(-(-size // _ALIGN) * _ALIGN, _ALIGN)


class HostBufferPool:
    """Free list of :class:`HostBuffer` by size; ``get`` reuses the smallest that fits."""

    def __init__(self, bucket_bytes: int, *, max_free_bytes: int = 8 << 30):
        self.bucket_bytes = bucket_bytes
        self.max_free_bytes = max_free_bytes
        self._free: list[HostBuffer] = []
        self._lock = threading.Lock()
        self.created = 0

    def get(self, nbytes: int) -> HostBuffer:
        with self._lock:
            fits = [b for b in self._free if b.size >= nbytes and not _busy(b)]
            if fits:
                buf = min(fits, key=lambda b: b.size)
                self._free.remove(buf)
                return buf
        self.created += 1
        return HostBuffer(size_class(nbytes, self.bucket_bytes))

    def put(self, buf: HostBuffer) -> bool:
        """Return ``buf``; it is handed out again only once ``buf.busy`` (if set) says it is idle.
        False when the pool let it go (more memory parked than any version needs)."""
        with self._lock:
            if any(b is buf for b in self._free):
                return True
            if sum(b.size for b in self._free) + buf.size > self.max_free_bytes:
                return False
            self._free.append(buf)
            return True

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def _busy(buf: HostBuffer) -> bool:
    return buf.busy is not None and buf.busy()


class ReceivePool:
    """Receiver buffers lent per version; ``release(version)`` returns them to the pool."""

    def __init__(self, bucket_bytes: int, *, keep_versions: int = 4):
        self._pool = HostBufferPool(bucket_bytes)
        self._lent: dict[int, list[HostBuffer]] = {}
        self._held: list[HostBuffer] = []  # let go of while busy: kept mapped until idle
        self._lock = threading.Lock()
        self._keep = keep_versions

    def lend(self, version: int, nbytes: int) -> HostBuffer:
        buf = self._pool.get(nbytes)
        with self._lock:
            self._lent.setdefault(version, []).append(buf)
            while len(self._lent) > self._keep:
                # A version nobody released (its publisher vanished mid-transfer): forget it.
                for old in self._lent.pop(min(self._lent)):
                    self._hold(old)
            self._held = [b for b in self._held if _busy(b)]
        return buf

    def release(self, version: int) -> None:
        with self._lock:
            bufs = self._lent.pop(version, [])
        for buf in bufs:
            if not self._pool.put(buf):
                with self._lock:
                    self._hold(buf)

    def forget(self, buf: HostBuffer) -> None:
        """Never reuse ``buf`` (a transfer into it was abandoned and may still write); it stays
        mapped until that transfer is over."""
        with self._lock:
            for bufs in self._lent.values():
                for i, b in enumerate(bufs):
                    if b is buf:
                        del bufs[i]
                        break
            self._hold(buf)

    def _hold(self, buf: HostBuffer) -> None:
        if _busy(buf) and not any(b is buf for b in self._held):
            self._held.append(buf)

    @property
    def held(self) -> int:
        """Buffers let go of while a transfer could still write into them, not yet unmapped."""
        with self._lock:
            self._held = [b for b in self._held if _busy(b)]
            return len(self._held)

    @property
    def created(self) -> int:
        return self._pool.created


__all__ = ["HostBuffer", "HostBufferPool", "ReceivePool", "size_class"]
