"""Layout transforms of a cache: KV dtype, RoPE re-rotation, head permutation -- all or nothing.

Every new tensor of every layer is computed before any is installed, so a transform that fails
(bad map, unsupported layer, ...) raises :class:`KVMigrationError` and leaves the cache exactly as
it was. The price is a second copy of the cache while the transform runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import KVMigrationError
from .caches import CacheRef, make_ref
from .heads import validate_head_map
from .rope import RopeSnapshot, rerotate_keys, rope_needs_change


@dataclass
class MigrationPlan:
    """What to change; an empty plan changes nothing."""

    dtype: Optional[torch.dtype] = None
    """Convert K and V to this dtype (None keeps each tensor's dtype)."""

    head_map: Optional[Sequence[int]] = None
    """Gather along the head axis: ``new[:, j] = old[:, head_map[j]]``."""

    rope_from: Optional[RopeSnapshot] = None
    """Rotary state the cached keys were computed with."""

    rope_to: Optional[RopeSnapshot] = None
    """Rotary state the new version computes keys with."""

    @property
    def rope(self) -> bool:
        return rope_needs_change(self.rope_from, self.rope_to)

    def describe(self) -> str:
        parts = []
        if self.dtype is not None:
            parts.append(f"dtype->{str(self.dtype).replace('torch.', '')}")
        if self.rope:
            parts.append(f"RoPE {self.rope_from.describe()} -> {self.rope_to.describe()}")  # type: ignore[union-attr]
        if self.head_map is not None:
            parts.append(f"head map {list(self.head_map)}")
        return "; ".join(parts) or "no transform"


def apply_plan(ref: CacheRef, plan: MigrationPlan) -> list[str]:
    """Transform the cache behind ``ref``; returns the transforms that changed something.

    Raises KVMigrationError (cache untouched) when any part cannot be applied.
    """
    pairs = ref.pairs()
    present = [kv for kv in pairs if kv is not None]
    if not present:
        return []
    head_axis, seq_axis = ref.head_axis, ref.seq_axis
    rope = plan.rope
    index = None
    if plan.head_map is not None:
        stored = {k.shape[head_axis] for k, _ in present}
        if len(stored) != 1:
            raise KVMigrationError(f"layers store different head counts {sorted(stored)}; one head map cannot fit")
        head_map = validate_head_map(list(plan.head_map), stored.pop())
        if head_map != list(range(len(head_map))):
            index = head_map
    angles: dict[tuple[int, int, str], tuple[Any, Any]] = {}
    changed: set[str] = set()
    new_pairs: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = []
    for kv in pairs:
        if kv is None:
            new_pairs.append(None)
            continue
        k, v = kv
        dtype = plan.dtype or k.dtype
        if rope:
            key = (k.shape[seq_axis], k.shape[-1], str(k.device))
            if key not in angles:
                angles[key] = (plan.rope_from.cos_sin(key[0], key[1], k.device),  # type: ignore[union-attr]
                               plan.rope_to.cos_sin(key[0], key[1], k.device))  # type: ignore[union-attr]
            old, new = angles[key]
            k = rerotate_keys(k, old, new, seq_axis).to(dtype)
            changed.add("rope")
        if dtype != k.dtype or dtype != v.dtype:
            k, v = k.to(dtype), v.to(dtype)
            changed.add("dtype")
        if index is not None:
            idx = torch.tensor(index, dtype=torch.long, device=k.device)
            k, v = k.index_select(head_axis, idx), v.index_select(head_axis, idx)
            changed.add("heads")
        new_pairs.append((k, v))
    if changed:
        ref.check_transformable()  # before anything is installed: an unsupported layer changes nothing
        ref.replace(new_pairs)
    return sorted(changed)


def migrate_cache(cache: Any, *, dtype: Optional[torch.dtype] = None, head_map: Optional[Sequence[int]] = None,
                  rope_from: Optional[RopeSnapshot] = None, rope_to: Optional[RopeSnapshot] = None,
                  head_axis: int = 1, seq_axis: int = 2) -> list[str]:
    """Transform ``cache`` (a transformers Cache or a list of (K, V) pairs) in place, all or nothing.

    Returns the names of the transforms that changed something (``dtype``, ``heads``, ``rope``).
    Raises KVMigrationError and leaves the cache untouched when the plan does not fit it.
    """
    return apply_plan(make_ref(cache, head_axis, seq_axis),
                      MigrationPlan(dtype=dtype, head_map=head_map, rope_from=rope_from, rope_to=rope_to))
