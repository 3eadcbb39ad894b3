"""Publisher side of delta sync: per-range snapshots of what was sent, and the entries of a version.

Each tensor is cut into ranges of at most one bucket of dense bytes; the cut depends only on the
tensor (never on what precedes it in a bucket), so a range is the same from version to version.
Per range the encoder keeps two host buffers in the wire dtype:

* ``base``: the bytes of the last committed version that carried this range (``base_tag``);
* ``scratch``: the bytes of the version being encoded (``scratch_tag``; 0 while being written).

Encoding version v copies the source into ``scratch`` (this copy is also the ``send_dtype`` cast),
compares it bit-wise with ``base`` and writes a delta entry against ``base_tag``, or a dense entry
where that is smaller (``delta="auto"``) or no base exists yet. :meth:`DeltaEncoder.commit` swaps
the two buffers, so a committed version costs no copy and an aborted one simply leaves ``base``
alone. The old base keeps its tag until it is overwritten, so resync requests for either the
committed or the in-flight version can be served (:mod:`.resync`).

Memory: two copies of the model in the wire dtype, in host memory.

``delta="auto"`` sends a range dense when more than ``AUTO_DENSE_ABOVE`` of its elements changed
(and then skips the comparison for a growing number of versions, ``MAX_DENSE_SKIP`` at most):
the codec encodes about 1-2 GB/s of dense bytes at RL-like densities (1-3%) but its cost grows with
every changed element, so an update that touches most elements (a large learning rate, a reset
layer) takes seconds to encode for a payload that saves little. ``"always"`` skips that check.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import xxhash

from ..config import SyncConfig
from ..hostcopy import host_copy
from ..source import FLUSH
from ..wire import delta as codec
from ..wire.bucket import ENC_DELTA, Entry, align, header_size, layout_payload
from ..wire.dtypes import itemsize
from ..wire.packer import PlannedBucket, wire_tensor

log = logging.getLogger(__name__)

AUTO_DENSE_ABOVE = 0.5
"""Changed fraction of a range above which ``delta="auto"`` sends it dense."""

AUTO_DENSE_MIN_ELEMENTS = 1 << 16
"""Smaller ranges are always considered for delta: encoding them costs microseconds."""

MAX_DENSE_SKIP = 16
"""After a dense-ish version, ``auto`` sends a range dense without snapshot or comparison for the
next 1, 2, 4, ... (at most this many) versions before probing again, so training whose updates
touch most weights pays almost nothing for delta support."""

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
RangeKey = tuple[str, int, int]
"""(tensor name, first element, element count)."""


def delta_capable(dtype: torch.dtype) -> bool:
    """Whether elements of ``dtype`` can be delta-encoded (1, 2, 4 or 8 bytes, not complex)."""
    return not dtype.is_complex and itemsize(dtype) in _INT_VIEW


def bits_of(t: torch.Tensor) -> np.ndarray:
    """The bytes of a flat, contiguous CPU tensor as unsigned integers of its item size (no copy)."""
    size = t.element_size()
    return t.view(_INT_VIEW[size]).numpy().view(codec.UINT_TYPES[size])


def xxh3_of(t: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(t.view(torch.uint8).numpy()) if t.numel() else xxhash.xxh3_64_intdigest(b"")


def copy_range(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (the send_dtype cast and any device-to-host copy), single-threaded where exact."""
    host_copy(dst, src)


def range_starts(numel: int, dtype: torch.dtype, bucket_bytes: int) -> Iterator[tuple[int, int]]:
    """The fixed cut of a tensor into ranges of at most one bucket of dense bytes."""
    step = max(bucket_bytes // itemsize(dtype), 1)
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, step):
        yield start, min(step, numel - start)


@dataclass
class DeltaStats:
    """What delta encoding did in one version; every number is measured."""

    elements: int = 0
    """Elements of ranges that had a base to compare against."""
    changed: int = 0
    """Of those, elements whose bytes differ from the base."""
    dense_bytes: int = 0
    """Payload bytes a dense send of every range would take."""
    payload_bytes: int = 0
    """Payload bytes actually planned: delta payloads plus dense entries."""
    delta_entries: int = 0
    dense_entries: int = 0
    encode_seconds: float = 0.0
    """Snapshot copy, comparison, encoding and checksums."""

    @property
    def density(self) -> float:
        return self.changed / self.elements if self.elements else 0.0


class _Range:
    __slots__ = ("dtype", "shape", "count", "base", "base_tag", "base_hash", "scratch", "scratch_tag",
                 "scratch_hash", "dense_streak", "skip")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], count: int):
        self.dtype, self.shape, self.count = dtype, shape, count
        self.base: Optional[torch.Tensor] = None
        self.base_tag = 0
        self.base_hash: Optional[int] = None
        self.scratch: Optional[torch.Tensor] = None
        self.scratch_tag = 0
        self.scratch_hash: Optional[int] = None
        self.dense_streak = 0
        self.skip = 0


class DeltaEncoder:
    """Keeps the snapshots and plans the buckets of each version (one publisher, one thread encodes)."""

    def __init__(self, config: SyncConfig):
        self.mode = config.delta
        self.zstd_level: Optional[int] = 3 if config.delta_zstd else None
        if self.zstd_level is not None:
            codec._zstd()  # a missing zstandard fails here, at start-up, with the pip command
        self.bucket_bytes = config.bucket_bytes
        self.send_dtype = config.torch_send_dtype
        self._ranges: dict[RangeKey, _Range] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- one version
    def plan(self, items: Iterable[tuple[str, torch.Tensor]], version: int, *, allow_delta: bool,
             stats: DeltaStats) -> Iterator[PlannedBucket]:
        """Buckets of ``version``: every range snapshotted, then encoded as delta or dense.

        On a :data:`~hotweights_trainer.source.FLUSH` mark the bucket being filled is yielded at once:
        ranges sent straight from the source must be packed before it advances (a ZeRO-3 group is then
        released).
        """
        entries: list[Entry] = []
        sources: list[torch.Tensor] = []
        used = 0
        for item in items:
            if item is FLUSH:
                tensor = src = flat = source = None  # noqa: F841 - our last references into the group
                if entries:
                    plan = _planned(entries, sources)
                    entries, sources, used = [], [], 0
                    yield plan
                    plan.sources.clear()  # packed
                continue
            name, tensor = item
            src, dtype = wire_tensor(tensor, self.send_dtype)
            flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().reshape(-1)
            shape = tuple(src.shape)
            for start, count in range_starts(flat.numel(), dtype, self.bucket_bytes):
                t0 = time.perf_counter()
                entry, source = self._encode(name, dtype, shape, flat, start, count, version, allow_delta,
                                             stats)
                stats.encode_seconds += time.perf_counter() - t0
                stats.payload_bytes += entry.payload_nbytes if entry.encoding else count * itemsize(dtype)
                stats.dense_bytes += count * itemsize(dtype)
                size = align(entry.payload_nbytes if entry.encoding else count * itemsize(dtype))
                if entries and used + size > self.bucket_bytes:
                    yield _planned(entries, sources)
                    entries, sources, used = [], [], 0
                entries.append(entry)
                sources.append(source)
                used += size
        if entries:
            yield _planned(entries, sources)

    def _encode(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], flat: torch.Tensor, start: int,
                count: int, version: int, allow_delta: bool, stats: DeltaStats) -> tuple[Entry, torch.Tensor]:
        dense = Entry(name, dtype, shape, start, count)
        if count == 0 or not delta_capable(dtype):
            return dense, flat[start:start + count]
        key = (name, start, count)
        r = self._ranges.get(key)
        if r is None or r.dtype != dtype or r.shape != shape:
            r = self._ranges[key] = _Range(dtype, shape, count)
        if self.mode == "auto" and allow_delta and r.skip > 0:
            # Recent versions changed most of this range: send it straight from the source (one copy,
            # no snapshot, no comparison) and probe again later, backing off while it stays dense.
            r.skip -= 1
            with self._lock:
                r.scratch_tag = 0
                r.base_tag, r.base_hash = 0, None  # the base is stale from now on
            stats.dense_entries += 1
            return dense, flat[start:start + count]
        with self._lock:
            r.scratch_tag = 0  # being overwritten: resync must not read it now
        if r.scratch is None:
            r.scratch = torch.empty(count, dtype=dtype)
        copy_range(r.scratch, flat[start:start + count])
        payload: Optional[bytes] = None
        new_hash: Optional[int] = None
        if allow_delta and r.base is not None and r.base_tag:
            old, new = bits_of(r.base), bits_of(r.scratch)
            differ = old != new
            n_changed = int(np.count_nonzero(differ))
            stats.elements += count
            stats.changed += n_changed
            dense_nbytes = count * itemsize(dtype)
            forced = self.mode == "always"
            if not forced and count >= AUTO_DENSE_MIN_ELEMENTS and n_changed > AUTO_DENSE_ABOVE * count:
                # Dense-ish: a delta may still be a little smaller, but encoding it costs far more
                # time than it saves on any link we measured (see the module docstring).
                plan = None
                r.dense_streak += 1
                r.skip = min(1 << (r.dense_streak - 1), MAX_DENSE_SKIP)
            else:
                r.dense_streak = 0
                positions = np.flatnonzero(differ) if n_changed else np.zeros(0, dtype=np.int64)
                plan = codec.analyze(old, new, positions, limit=None if forced else dense_nbytes)
            if plan is not None:
                payload = codec.serialize(plan, r.base_tag, zstd_level=self.zstd_level)
                if not forced and len(payload) >= dense_nbytes:
                    payload = None  # zstd made it larger than dense
            if payload is not None:
                unchanged = len(positions) == 0 and r.base_hash is not None
                new_hash = r.base_hash if unchanged else xxh3_of(r.scratch)
        with self._lock:
            r.scratch_tag = version
            r.scratch_hash = new_hash
        if payload is None:
            stats.dense_entries += 1
            return dense, r.scratch
        stats.delta_entries += 1
        entry = Entry(name, dtype, shape, start, count, payload_nbytes=len(payload), encoding=ENC_DELTA,
                      tensor_xxh3=new_hash or 0)
        return entry, torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def commit(self, version: int) -> None:
        """``version`` is committed: its snapshots become the bases of the next version."""
        with self._lock:
            for r in self._ranges.values():
                if r.scratch_tag == version:
                    r.base, r.scratch = r.scratch, r.base
                    r.base_tag, r.scratch_tag = version, r.base_tag
                    r.base_hash, r.scratch_hash = r.scratch_hash, r.base_hash

    # ---------------------------------------------------------------- resync support
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold while reading snapshots from another thread (the encoder then waits to overwrite)."""
        with self._lock:
            yield

    def describe(self, key: RangeKey) -> Optional[tuple[torch.dtype, tuple[int, ...]]]:
        r = self._ranges.get(key)
        return None if r is None else (r.dtype, r.shape)

    def snapshot(self, key: RangeKey, version: int) -> Optional[torch.Tensor]:
        """The bytes ``key`` had in ``version``, if still held (call under :meth:`locked`)."""
        r = self._ranges.get(key)
        if r is None:
            return None
        if r.base_tag == version and r.base is not None:
            return r.base
        if r.scratch_tag == version and r.scratch is not None:
            return r.scratch
        return None

    @property
    def range_count(self) -> int:
        return len(self._ranges)

    @property
    def snapshot_bytes(self) -> int:
        """Host memory held by snapshots."""
        total = 0
        for r in self._ranges.values():
            for t in (r.base, r.scratch):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


def _planned(entries: list[Entry], sources: list[torch.Tensor]) -> PlannedBucket:
    laid, plen = layout_payload(entries)
    return PlannedBucket(laid, list(sources), header_size(laid), plen, presliced=True)


def plan_dense(items: Iterable[tuple[Entry, torch.Tensor]], bucket_bytes: int) -> Iterator[PlannedBucket]:
    """Group ready-made dense (entry, range tensor) pairs into buckets (used for resync)."""
    entries: list[Entry] = []
    sources: list[torch.Tensor] = []
    used = 0
    for entry, source in items:
        size = align(entry.elem_count * itemsize(entry.dtype))
        if entries and used + size > bucket_bytes:
            yield _planned(entries, sources)
            entries, sources, used = [], [], 0
        entries.append(entry)
        sources.append(source)
        used += size
    if entries:
        yield _planned(entries, sources)
