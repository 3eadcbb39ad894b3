"""Byte copies between host tensors that stay fast when the machine is busy.

torch's ``copy_`` splits large copies over its intra-op thread pool. When the cores are already
busy (training threads, an inference server, other processes) one of those threads is often not
scheduled and the whole copy waits for it: on a loaded 2-core machine we measured a 256 MiB copy
taking 5x longer through torch than through one plain memcpy. A same-dtype copy between contiguous
host tensors is therefore done with numpy (one thread, no pool); anything else (casts, device
copies, strided tensors) goes through torch.

Used for the copies that run while training runs (delta snapshots under async publishing), and, through
:class:`HashedWriter`, for packing host buckets. Applying keeps torch's parallel copy: it runs while
the server waits, when torch's pool is idle.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
import xxhash


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, through a single-threaded memcpy where that is exact."""
    if (dst.dtype == src.dtype and dst.device.type == "cpu" and src.device.type == "cpu"
            and dst.is_contiguous() and src.is_contiguous() and dst.numel() == src.numel()
            and not src.requires_grad and not dst.requires_grad and dst.numel() > 0):
        np.copyto(_bytes(dst), _bytes(src))
    else:
        dst.copy_(src)


CHUNK_BYTES = 256 << 10
"""Copy-then-hash step of :class:`HashedWriter`: small enough that the bytes just copied are still in
the core's L2 cache when they are hashed, large enough that the per-chunk Python cost is noise."""


class HashedWriter:
    """Fills a writable host buffer front to back and keeps the xxh3-64 of everything written.

    Packing used to walk the bytes twice in series (copy into the bucket, then hash the bucket from
    memory). Here each :data:`CHUNK_BYTES` chunk is hashed right after it is copied, while it is still
    in cache, so hashing costs little more than the copy. Copies run through ``memmove`` on one
    thread (``ctypes`` releases the GIL, and so does xxhash on its buffers): on a 2-core machine the
    other core is left to the receiver, which verifies the previous bucket meanwhile.
    """

    def __init__(self, buf: memoryview, start: int):
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")  # offsets below are byte offsets
        self._buf = buf
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # writable buffers only
        self._pos = start
        self._state = xxhash.xxh3_64()

    @property
    def pos(self) -> int:
        return self._pos

    def copy_from(self, src: torch.Tensor, byte_off: int, nbytes: int) -> bool:
        """Append ``nbytes`` of ``src``'s memory starting ``byte_off`` bytes into it; False (nothing
        written) when ``src`` is not a contiguous host tensor holding that range."""
        if (src.device.type != "cpu" or not src.is_contiguous() or byte_off < 0
                or byte_off + nbytes > src.numel() * src.element_size()
                or self._pos + nbytes > len(self._buf)):
            return False
        s = src.data_ptr() + byte_off
        d = self._base + self._pos
        end = self._pos + nbytes
        while self._pos < end:
            n = min(CHUNK_BYTES, end - self._pos)
            ctypes.memmove(d, s, n)
            self._state.update(self._buf[self._pos:self._pos + n])
            self._pos += n
            d += n
            s += n
        return True

    def hash_written(self, nbytes: int) -> None:
        """The next ``nbytes`` were written by other means (a cast, an encoded payload): hash them."""
        self._state.update(self._buf[self._pos:self._pos + nbytes])
        self._pos += nbytes

    def zero_to(self, pos: int) -> None:
        """Zero-fill up to ``pos`` (alignment padding: the same bytes in a reused buffer every time)."""
        if pos > self._pos:
            ctypes.memset(self._base + self._pos, 0, pos - self._pos)
            self.hash_written(pos - self._pos)

    def digest(self) -> int:
        return self._state.intdigest()
