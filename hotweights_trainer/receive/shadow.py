"""Receiver side of delta sync: the base copy that patches apply to, and staging of delta entries.

On ``shm://`` a staged bucket is a read-only view of the publisher's shared memory, so patches can
never be applied there. The receiver keeps a *shadow*: a private copy, per range, of the bytes of
the newest version it committed (tagged with publisher session and version). For each entry of a
version being staged:

* dense entry: copied into a fresh private tensor (it becomes the shadow on commit);
* delta entry whose base is exactly the shadow's tag: decoded into a fresh tensor (the shadow is
  never modified, so an aborted version leaves it intact), then its xxh3 is checked against the
  entry's ``tensor_xxh3``;
* anything else (no shadow, other base version, checksum mismatch): the range is *needed*; the
  receiver asks the publisher for a dense copy (:mod:`.resync`) and stages only once every needed
  range arrived and matched the checksum the delta entry announced.

The staged version carries the private tensors, so apply copies from them (not from shared memory),
and on commit they become the new shadow: no copy. Memory: one copy of the model in the wire dtype,
plus one more while a version is staged.

Private tensors are recycled: each is reference-counted by the shadow and by the staged versions
holding it (staging, pending, being applied), and goes back to a pool once none does. Fresh memory
costs page faults on first touch, several times slower than the decode itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import CorruptBucketError, WireFormatError
from .staging import StagedVersion, payload_tensor
from ..wire import delta as codec
from ..wire.bucket import ENC_DELTA, ENC_DENSE, BucketHeader
from ..delta.encoder import RangeKey, bits_of, copy_range, xxh3_of

log = logging.getLogger(__name__)


@dataclass
class _Shadow:
    session: int
    version: int
    tensor: torch.Tensor
    xxh3: Optional[int] = None


class _Pool:
    """Reference counts of private tensors, and a free list of the unreferenced ones by (dtype, numel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, list] = {}  # id -> [tensor, count]
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}

    def take(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get((dtype, numel))
            t = free.pop() if free else None
        return t if t is not None else torch.empty(numel, dtype=dtype)

    def ref(self, t: torch.Tensor) -> None:
        with self._lock:
            slot = self._refs.setdefault(id(t), [t, 0])
            slot[1] += 1

    def unref(self, t: torch.Tensor) -> None:
        with self._lock:
            slot = self._refs.get(id(t))
            if slot is None:
                return
            slot[1] -= 1
            if slot[1] <= 0:
                del self._refs[id(t)]
                self._free.setdefault((t.dtype, t.numel()), []).append(t)

    def give_back(self, t: torch.Tensor) -> None:
        """A tensor taken but never handed to a staged version (e.g. failed its checksum)."""
        with self._lock:
            if id(t) not in self._refs:
                self._free.setdefault((t.dtype, t.numel()), []).append(t)


class ShadowStore:
    def __init__(self) -> None:
        self._ranges: dict[RangeKey, _Shadow] = {}
        self._pool = _Pool()
        self.enabled = False
        """Keep private copies of dense entries: set once the publisher says it sends deltas."""

    def _hold(self, st: StagedVersion, key: RangeKey, tensor: torch.Tensor, xxh3: Optional[int]) -> None:
        old = st.private.get(key)
        st.private[key] = tensor
        st.hashes[key] = xxh3
        self._pool.ref(tensor)
        if old is not None:
            self._pool.unref(old)

    def _copy(self, data: memoryview, header: BucketHeader, e) -> torch.Tensor:
        t = self._pool.take(e.dtype, e.elem_count)
        copy_range(t, payload_tensor(data, header, e))
        return t

    def __len__(self) -> int:
        return len(self._ranges)

    # ---------------------------------------------------------------- staging (transport thread)
    def stage_bucket(self, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
        """Give every entry of a verified bucket its private tensor, or record it as needed."""
        for e in header.entries:
            key = (e.name, e.elem_start, e.elem_count)
            if e.encoding == ENC_DENSE:
                if self.enabled and e.elem_count:
                    self._hold(st, key, self._copy(data, header, e), None)
                continue
            if e.encoding != ENC_DELTA:
                raise WireFormatError(f"tensor {e.name!r}: encoding {e.encoding} is not staged here")
            t0 = time.perf_counter()
            payload = np.frombuffer(data, dtype=np.uint8, count=e.payload_nbytes,
                                    offset=header.header_len + e.payload_off)
            delta = codec.read_header(payload)
            if delta.count != e.elem_count or delta.itemsize != e.dtype.itemsize:
                raise WireFormatError(f"tensor {e.name!r}: delta payload is for {delta.count} x "
                                      f"{delta.itemsize} bytes, the entry has {e.elem_count} x {e.dtype}")
            shadow = self._ranges.get(key)
            if shadow is not None and shadow.session == st.session and shadow.tensor.dtype == e.dtype:
                if shadow.version == delta.base_version:
                    new = self._patch(shadow, payload, e.tensor_xxh3, delta.n_changed)
                    st.decode_seconds += time.perf_counter() - t0
                    if new is not None:
                        self._hold(st, key, new, e.tensor_xxh3)
                        continue
                    log.warning("tensor %s [%d, +%d): checksum mismatch after patching version %d onto "
                                "version %d; asking for a dense copy", e.name, e.elem_start, e.elem_count,
                                st.version, shadow.version)
                elif shadow.version == st.version and self._hash(shadow) == e.tensor_xxh3:
                    self._hold(st, key, shadow.tensor, e.tensor_xxh3)  # a catch-up of what we hold
                    continue
            st.needs[key] = e.tensor_xxh3

    def fill_resync(self, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
        """Dense copies the publisher sent for needed ranges; each must match the announced checksum."""
        if header.version != st.version or header.session != st.session:
            raise WireFormatError(f"resync bucket belongs to version {header.version}/session {header.session:x}, "
                                  f"expected version {st.version}/session {st.session:x}")
        for e in header.entries:
            key = (e.name, e.elem_start, e.elem_count)
            if e.encoding != ENC_DENSE or key not in st.needs:
                continue  # an answer to an older request, or a range already filled
            t = self._copy(data, header, e)
            want = st.needs[key]
            if want and xxh3_of(t) != want:
                self._pool.give_back(t)
                raise CorruptBucketError(
                    f"resync copy of {e.name!r} [{e.elem_start}, +{e.elem_count}) does not match the checksum "
                    f"its delta entry announced for version {st.version}")
            self._hold(st, key, t, want or None)
            del st.needs[key]

    # ---------------------------------------------------------------- commit
    def commit(self, st: StagedVersion) -> None:
        """``st`` is committed: its private tensors are the bases of the next delta."""
        for key, tensor in st.private.items():
            old = self._ranges.get(key)
            self._ranges[key] = _Shadow(st.session, st.version, tensor, st.hashes.get(key))
            self._pool.ref(tensor)
            if old is not None:
                self._pool.unref(old.tensor)
        stale = [k for k, s in self._ranges.items() if s.session != st.session]
        for k in stale:
            self._pool.unref(self._ranges.pop(k).tensor)

    def release(self, st: StagedVersion) -> None:
        """``st`` is applied or discarded: its private tensors may be reused once nothing holds them."""
        for tensor in st.private.values():
            self._pool.unref(tensor)
        st.private.clear()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _hash(shadow: _Shadow) -> int:
        if shadow.xxh3 is None:
            shadow.xxh3 = xxh3_of(shadow.tensor)
        return shadow.xxh3

    def _patch(self, shadow: _Shadow, payload: np.ndarray, want: int, n_changed: int) -> Optional[torch.Tensor]:
        # Always verified: a delta is only ever applied with the checksum of its result.
        if n_changed == 0:
            return shadow.tensor if self._hash(shadow) == want else None
        out = self._pool.take(shadow.tensor.dtype, shadow.tensor.numel())
        codec.decode(payload, bits_of(shadow.tensor), out=bits_of(out))
        if xxh3_of(out) == want:
            return out
        self._pool.give_back(out)
        return None
