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
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import CorruptBucketError, WireFormatError
from ..staging import StagedVersion, payload_tensor
from ..wire import delta as codec
from ..wire.bucket import ENC_DELTA, ENC_DENSE, BucketHeader
from .encoder import RangeKey, bits_of, xxh3_of

log = logging.getLogger(__name__)


@dataclass
class _Shadow:
    session: int
    version: int
    tensor: torch.Tensor
    xxh3: Optional[int] = None


class ShadowStore:
    def __init__(self) -> None:
        self._ranges: dict[RangeKey, _Shadow] = {}
        self.enabled = False
        """Keep private copies of dense entries: set once the publisher says it sends deltas."""

    def __len__(self) -> int:
        return len(self._ranges)

    # ---------------------------------------------------------------- staging (transport thread)
    def stage_bucket(self, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
        """Give every entry of a verified bucket its private tensor, or record it as needed."""
        for e in header.entries:
            key = (e.name, e.elem_start, e.elem_count)
            if e.encoding == ENC_DENSE:
                if self.enabled and e.elem_count:
                    st.private[key] = payload_tensor(data, header, e).clone()
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
                        st.private[key] = new
                        st.hashes[key] = e.tensor_xxh3
                        continue
                    log.warning("tensor %s [%d, +%d): checksum mismatch after patching version %d onto "
                                "version %d; asking for a dense copy", e.name, e.elem_start, e.elem_count,
                                st.version, shadow.version)
                elif shadow.version == st.version and self._hash(shadow) == e.tensor_xxh3:
                    st.private[key] = shadow.tensor  # a catch-up of the version we already hold
                    st.hashes[key] = e.tensor_xxh3
                    continue
            st.needs[key] = e.tensor_xxh3

    def fill_resync(self, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
        """Dense copies the publisher sent for needed ranges; each must match the announced checksum."""
        for e in header.entries:
            key = (e.name, e.elem_start, e.elem_count)
            if e.encoding != ENC_DENSE or key not in st.needs:
                continue  # an answer to an older request, or a range already filled
            t = payload_tensor(data, header, e).clone()
            want = st.needs[key]
            if want and xxh3_of(t) != want:
                raise CorruptBucketError(
                    f"resync copy of {e.name!r} [{e.elem_start}, +{e.elem_count}) does not match the checksum "
                    f"its delta entry announced for version {st.version}")
            st.private[key] = t
            st.hashes[key] = want or None
            del st.needs[key]

    # ---------------------------------------------------------------- commit
    def commit(self, st: StagedVersion) -> None:
        """``st`` is committed: its private tensors are the bases of the next delta."""
        for key, tensor in st.private.items():
            self._ranges[key] = _Shadow(st.session, st.version, tensor, st.hashes.get(key))
        stale = [k for k, s in self._ranges.items() if s.session != st.session]
        for k in stale:
            del self._ranges[k]

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
        out = torch.empty_like(shadow.tensor)
        codec.decode(payload, bits_of(shadow.tensor), out=bits_of(out))
        return out if xxh3_of(out) == want else None
