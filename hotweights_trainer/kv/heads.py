"""KV-head maps: derive, parse and validate permutations along a cache's head axis.

Notation: H query heads, KvH KV heads, G = H / KvH query heads per KV head.

A *compact* cache stores KvH heads (what Hugging Face models keep for GQA). A cache *kept with
repeated KV heads* (an expanded cache) stores H heads, G copies of each KV head, in one of two orders:

- ``grouped``: each KV head's G copies sit next to each other; slot ``kv * G + g`` holds KV head
  ``kv`` (``repeat_interleave``, the order of Hugging Face's ``repeat_kv``);
- ``interleaved``: the slots cycle through the KV heads; slot ``g * KvH + kv`` holds KV head ``kv``
  (``repeat``).

A head map ``m`` is applied as a gather: ``new[..., j, ...] = old[..., m[j], ...]`` along the head
axis. The *derived* map converts an expanded cache from the other order into ``order``:

- into grouped (from interleaved):  ``m[kv * G + g] = g * KvH + kv``
- into interleaved (from grouped):  ``m[g * KvH + kv] = kv * G + g``

for ``kv`` in ``0..KvH-1`` and ``g`` in ``0..G-1``. The two maps are inverse permutations of each
other. A compact cache holds each KV head once, so the two orders differ only in which query heads
read which KV head (that lives in the weights): its derived map is the identity of length KvH.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from ..errors import KVMigrationError

HeadOrder = Literal["grouped", "interleaved"]
ORDERS: tuple[str, ...] = ("grouped", "interleaved")


@dataclass(frozen=True)
class HeadCounts:
    """Query and KV head counts of a model; raises KVMigrationError when they do not fit together."""

    heads: int
    kv_heads: int

    def __post_init__(self) -> None:
        for name, value in (("heads", self.heads), ("kv_heads", self.kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVMigrationError(f"{name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise KVMigrationError(f"{self.heads} query heads do not divide into {self.kv_heads} KV heads "
                                   f"({self.heads} % {self.kv_heads} = {self.heads % self.kv_heads})")

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.heads // self.kv_heads

    @classmethod
    def from_model_config(cls, config: Any) -> "HeadCounts":
        """Read ``num_attention_heads`` / ``num_key_value_heads`` from a transformers config."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        heads = getattr(config, "num_attention_heads", None)
        if heads is None:
            raise KVMigrationError(f"{type(config).__name__} has no num_attention_heads")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(int(heads), int(kv_heads))

    def layout_of(self, stored: int) -> Literal["compact", "expanded"]:
        """Which layout a cache storing ``stored`` heads on its head axis has."""
        if stored == self.kv_heads:
            return "compact"
        if stored == self.heads:
            return "expanded"
        raise KVMigrationError(
            f"the cache stores {stored} heads on its head axis, but the model has {self.kv_heads} KV heads "
            f"(compact cache) and {self.heads} query heads (cache with repeated KV heads): neither fits")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise KVMigrationError(f"head order must be one of {', '.join(ORDERS)}, got {order!r}")


def derive_head_map(counts: HeadCounts, order: str) -> list[int]:
    """The map (length H) that converts an expanded cache from the other order into ``order``."""
    _check_order(order)
    g_size, kvh = counts.group_size, counts.kv_heads
    out = [0] * counts.heads
    for kv in range(kvh):
        for g in range(g_size):
            if order == "grouped":
                out[kv * g_size + g] = g * kvh + kv
            else:
                out[g * kvh + kv] = kv * g_size + g
    return out


def expansion_index(counts: HeadCounts, order: str) -> list[int]:
    """For each slot of an expanded cache in ``order``, the KV head it holds."""
    _check_order(order)
    if order == "grouped":
        return [slot // counts.group_size for slot in range(counts.heads)]
    return [slot % counts.kv_heads for slot in range(counts.heads)]


def validate_head_map(head_map: Any, length: Optional[int] = None, *, what: str = "head map") -> list[int]:
    """Return ``head_map`` as a list of ints when it is a permutation of ``0..length-1``.

    Raises KVMigrationError naming the problem: not a list of integers, a repeated or out-of-range
    index, or the wrong length.
    """
    if not isinstance(head_map, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in head_map):
        raise KVMigrationError(f"{what} must be a JSON list of integers, got {head_map!r}"[:300])
    values = list(head_map)
    if not values:
        raise KVMigrationError(f"{what} is empty")
    if length is not None and len(values) != length:
        raise KVMigrationError(f"{what} has {len(values)} entries but the cache stores {length} heads")
    n = len(values)
    out_of_range = sorted({i for i in values if not 0 <= i < n})
    if out_of_range:
        raise KVMigrationError(f"{what} is not a permutation: {out_of_range[:8]} outside 0..{n - 1}")
    if len(set(values)) != n:
        dupes = sorted(i for i, count in Counter(values).items() if count > 1)
        missing = sorted(set(range(n)) - set(values))
        raise KVMigrationError(f"{what} is not a permutation: {dupes[:8]} repeated, {missing[:8]} missing")
    return values


def parse_head_map(text: str, *, source: str = "head map") -> list[int]:
    """Parse a JSON list of head indices and check that it is a permutation."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise KVMigrationError(f"{source} is not valid JSON: {exc}") from None
    return validate_head_map(value, what=source)


def read_head_map_file(path: str) -> list[int]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KVMigrationError(f"cannot read head map file {path!r}: {exc.strerror or exc}") from None
    return parse_head_map(text, source=f"head map file {path!r}")


def load_head_map(inline: Optional[str], path: Optional[str]) -> Optional[list[int]]:
    """The explicit map from ``kv_head_map`` (inline JSON) or ``kv_head_map_file``; None when neither."""
    if inline is not None and path is not None:
        raise KVMigrationError("set only one of HOTWEIGHTS_KV_HEAD_MAP and HOTWEIGHTS_KV_HEAD_MAP_FILE")
    if inline is not None:
        return parse_head_map(inline, source="HOTWEIGHTS_KV_HEAD_MAP")
    if path is not None:
        return read_head_map_file(path)
    return None


def check_map_fits(head_map: Sequence[int], counts: HeadCounts) -> Literal["compact", "expanded"]:
    """Which cache layout an explicit map's length fits (KvH: compact, H: expanded)."""
    if len(head_map) == counts.kv_heads:
        return "compact"
    if len(head_map) == counts.heads:
        return "expanded"
    raise KVMigrationError(
        f"head map has {len(head_map)} entries; a cache of this model stores {counts.kv_heads} heads "
        f"(compact, num_key_value_heads) or {counts.heads} heads (repeated KV heads, num_attention_heads)")
