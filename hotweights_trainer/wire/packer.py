"""Bucket planning and packing: ``(name, tensor)`` pairs -> flat, checksummed buckets.

The planner groups tensors into buckets of at most ``bucket_bytes`` of payload and splits tensors
that are larger than one bucket into element ranges, so any model moves in a handful of large
transfers. Packing copies (and, with ``send_dtype``, casts) each tensor straight into the transport's
buffer and checksums each chunk right after copying it: one pass over the bytes, no intermediate copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..source import FLUSH
from ..hostcopy import HashedWriter
from .bucket import ALIGN, ENC_DENSE, Entry, header_size, layout_payload, seal_header, write_header
from .dtypes import dtype_code, itemsize


@dataclass
class PlannedBucket:
    """Entries (with payload offsets) plus the source tensors they are cut from."""

    entries: list[Entry]
    sources: list[torch.Tensor]
    header_len: int
    payload_len: int
    presliced: bool = False
    """Each source holds exactly its entry's bytes (a range, or an encoded payload as uint8)."""

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len


def wire_tensor(t: torch.Tensor, send_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.dtype]:
    """The tensor to read from (contiguous) and the dtype it travels in."""
    dtype = send_dtype if (send_dtype is not None and t.is_floating_point()) else t.dtype
    dtype_code(dtype)  # fail early, with the supported list, on an unsendable dtype
    return t, dtype


def plan_buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 send_dtype: Optional[torch.dtype] = None) -> Iterator[PlannedBucket]:
    """Group tensors into buckets; tensors larger than a bucket are split across buckets.

    The consumer packs each bucket before it asks for the next one. On a :data:`FLUSH` mark the
    bucket being filled is yielded at once (even when not full), so it is packed before the source
    advances and releases the tensors it holds; afterwards the planner drops its references to them.
    """
    entries: list[Entry] = []
    sources: list[torch.Tensor] = []
    used = 0

    def flush() -> PlannedBucket:
        laid, plen = layout_payload(entries)
        return PlannedBucket(laid, list(sources), header_size(laid), plen)

    for item in items:
        if item is FLUSH:
            tensor = src = None  # noqa: F841 - our last reference into the group being released
            if entries:
                plan = flush()
                entries, sources, used = [], [], 0
                yield plan
                plan.sources.clear()  # packed; don't keep a released group's memory alive
            continue
        name, tensor = item
        src, dtype = wire_tensor(tensor, send_dtype)
        shape = tuple(src.shape)
        numel = src.numel()
        isz = itemsize(dtype)
        if not src.is_contiguous() and numel * isz > bucket_bytes:
            src = src.contiguous()  # once, not once per slice
        start = 0
        while True:
            room = bucket_bytes - used
            count = numel - start
            if count * isz > room:
                if entries and count * isz <= bucket_bytes:
                    # Whole rest fits an empty bucket: don't cut it, start a new bucket.
                    yield flush()
                    entries, sources, used = [], [], 0
                    continue
                count = max(room // isz, 0)
                if count == 0:
                    yield flush()
                    entries, sources, used = [], [], 0
                    continue
            entries.append(Entry(name, dtype, shape, start, count))
            sources.append(src)
            used += -(-(count * isz) // ALIGN) * ALIGN
            start += count
            if start >= numel:
                break
        if used >= bucket_bytes:
            yield flush()
            entries, sources, used = [], [], 0
    if entries:
        yield flush()


def pack_into(buf: memoryview, plan: PlannedBucket, *, version: int, index: int, session: int,
              flags: int = 0) -> int:
    """Write header and payload of ``plan`` into ``buf`` and seal it; returns the bucket length.

    The payload is written front to back, alignment padding zeroed, and hashed as it is written
    (:class:`~hotweights_trainer.hostcopy.HashedWriter`): one pass over the bytes instead of a copy
    followed by a second, from-memory pass for the checksum. Entries that need a cast, a device
    copy or a gather of a strided tensor go through torch and are hashed right after.
    """
    hlen = write_header(buf, version=version, index=index, session=session, entries=plan.entries,
                        payload_len=plan.payload_len, flags=flags)
    out = HashedWriter(buf, hlen)
    for entry, src in zip(plan.entries, plan.sources):
        out.zero_to(hlen + entry.payload_off)
        if entry.elem_count == 0 or entry.payload_nbytes == 0:
            continue
        if entry.encoding == ENC_DENSE and src.dtype == entry.dtype:
            isz = itemsize(entry.dtype)
            skip = 0 if plan.presliced else entry.elem_start * isz
            if out.copy_from(src, skip, entry.payload_nbytes):
                continue
        dst = torch.frombuffer(buf, dtype=torch.uint8, count=entry.payload_nbytes,
                               offset=hlen + entry.payload_off)
        if entry.encoding != ENC_DENSE:
            dst.copy_(src.reshape(-1))  # an encoded payload, already bytes
        else:
            dst = dst.view(entry.dtype)
            flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().reshape(-1)
            dst.copy_(flat if plan.presliced else flat[entry.elem_start:entry.elem_start + entry.elem_count])
        del dst
        out.hash_written(entry.payload_nbytes)
    out.zero_to(hlen + plan.payload_len)
    seal_header(buf, out.digest())
    return hlen + plan.payload_len


BufferFactory = Callable[[int], memoryview]
