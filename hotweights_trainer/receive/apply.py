"""Receiver-side apply: copy a committed, staged version into the model's tensors in place.

The last step of the receiving path (:mod:`.staging` verified and assembled the version first). Host
buckets are copied entry by entry; a version staged in device buckets is applied on its device by the
chunked, multi-stream :class:`~hotweights_trainer.gpu.scatter.DeviceScatter`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..gpu.scatter import DeviceScatter, byte_view
from ..naming import NameMap, map_name
from .device_bucket import DeviceBucket
from .staging import StagedVersion


def apply_to_targets(staged: StagedVersion, resolve: Callable[[str], tuple[Optional[str], Any]]) -> int:
    """Copy every entry of a complete version into the model tensors in place; returns bytes copied."""
    if any(isinstance(data, DeviceBucket) for _, data in staged.buckets.values()):
        return apply_device(staged, resolve)  # chunked device-side scatter over several streams
    copied = 0
    deferred: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for header, data, e in staged.entries():
            _, target = resolve(e.name)
            if target is None or e.elem_count == 0:
                continue
            dst = target.data
            src = staged.entry_tensor(header, data, e)
            if dst.is_contiguous():
                dst.view(-1)[e.elem_start:e.elem_start + e.elem_count].copy_(src)
            else:
                # Rare (e.g. a transposed buffer): assemble, then one strided copy.
                flat = deferred.setdefault(e.name, torch.empty(e.numel, dtype=e.dtype))
                flat[e.elem_start:e.elem_start + e.elem_count].copy_(src)
            copied += e.payload_nbytes
        for name, flat in deferred.items():
            _, target = resolve(name)
            target.data.copy_(flat.view(target.shape))
    return copied


def make_resolver(targets: Optional[dict[str, torch.Tensor]], name_map: NameMap):
    """Wire name -> (local name, tensor); (None, None) when ``name_map`` says to skip it."""
    cache: dict[str, tuple[Optional[str], Optional[torch.Tensor]]] = {}

    def resolve(wire: str) -> tuple[Optional[str], Optional[torch.Tensor]]:
        hit = cache.get(wire)
        if hit is None:
            local = map_name(wire, name_map)
            hit = (local, None if (local is None or targets is None) else targets.get(local))
            cache[wire] = hit
        return hit

    return resolve


def apply_device(staged: Any, resolve: Callable[[str], tuple[Optional[str], Any]]) -> int:
    """Copy every entry of a complete version staged in device buckets into the model, in place.

    One :class:`DeviceScatter` call for all contiguous targets (chunked over its streams); targets
    that are not contiguous are assembled on the bucket's device first and copied once. Returns once
    every copy is complete, so the staged buffers may be released right after. Returns bytes copied.
    """
    scatter: Optional[DeviceScatter] = None
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    deferred: dict[str, torch.Tensor] = {}
    copied = 0
    with torch.no_grad():
        for header, data, e in staged.entries():
            _, target = resolve(e.name)
            if target is None or e.elem_count == 0:
                continue
            if isinstance(data, DeviceBucket) and scatter is None:
                scatter = data.scatter
            src = staged.entry_tensor(header, data, e)
            dst = target.data
            if dst.is_contiguous():
                pairs.append((byte_view(dst.view(-1)[e.elem_start:e.elem_start + e.elem_count]), byte_view(src)))
            else:
                flat = deferred.setdefault(e.name, torch.empty(e.numel, dtype=e.dtype, device=src.device))
                flat[e.elem_start:e.elem_start + e.elem_count].copy_(src)
            copied += e.payload_nbytes
        if scatter is None:
            scatter = DeviceScatter(16 << 20, 1)
        scatter.copy(pairs, sync=True)
        for name, flat in deferred.items():
            _, target = resolve(name)
            target.data.copy_(flat.view(target.shape))
        if deferred and any(t.is_cuda for t in deferred.values()):  # pragma: no cover - needs a CUDA device
            torch.cuda.synchronize()
    return copied


__all__ = ["apply_to_targets", "apply_device", "make_resolver"]
