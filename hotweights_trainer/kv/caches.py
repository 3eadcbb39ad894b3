"""Uniform access to the two kinds of cache serving code registers.

- a Hugging Face ``transformers`` ``Cache`` (``DynamicCache``, ``StaticCache``, ...): a list of
  layers with ``keys`` / ``values`` of shape ``[batch, heads, seq, head_dim]``;
- plain per-layer ``(K, V)`` tensors, with the head and sequence axes the serving code declares
  (``[batch, heads, seq, head_dim]`` by default; head_dim is always last).

Both are held through weak references, so registering a cache never keeps it alive. Plain tensors
are changed in place through ``tensor.data = new`` so the serving code's own references see the
result.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch

from ..errors import KVCacheError, KVMigrationError

# Layer classes whose keys hold positions 0..S-1 (or zero padding after them): a transform may treat
# the whole tensor. Sliding-window layers hold the last W positions; quantized layers keep keys in
# another form; linear-attention layers hold no keys at all.
_PLAIN_LAYER_TYPES = ("DynamicLayer", "StaticLayer")


def is_hf_cache(obj: Any) -> bool:
    return isinstance(getattr(obj, "layers", None), list) and hasattr(obj, "get_seq_length")


class CacheRef:
    """A weak reference to one registered cache, with read and atomic replace of its (K, V) pairs."""

    kind: str
    head_axis: int = 1
    seq_axis: int = 2

    def alive(self) -> bool:
        raise NotImplementedError

    def get(self) -> Any:
        raise NotImplementedError

    def pairs(self) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """(K, V) per layer in the cache's own layout; None for a layer that holds nothing."""
        raise NotImplementedError

    def replace(self, pairs: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Install new (K, V) per layer (same layout). Called only once every tensor is computed."""
        raise NotImplementedError

    def seq_length(self) -> int:
        raise NotImplementedError

    def check_transformable(self) -> None:
        """Raise KVMigrationError when the cache's tensors are not plain K/V at positions 0..S-1."""

    def drop(self) -> None:
        """Free what can be freed (HF caches are reset); plain tensors belong to the caller."""


class HFCacheRef(CacheRef):
    kind = "hf"  # keys/values are [batch, heads, seq, head_dim]: the base class's axes

    def __init__(self, cache: Any):
        self._ref = weakref.ref(cache)

    def alive(self) -> bool:
        return self._ref() is not None

    def get(self) -> Any:
        return self._ref()

    def _layers(self) -> list[Any]:
        cache = self._ref()
        if cache is None:
            raise KVCacheError("the registered cache was garbage collected")
        return cache.layers

    def pairs(self) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
        out: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = []
        for layer in self._layers():
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            ok = getattr(layer, "is_initialized", True) and isinstance(k, torch.Tensor) and k.numel() > 0
            out.append((k, v) if ok else None)
        return out

    def check_transformable(self) -> None:
        for i, layer in enumerate(self._layers()):
            name = type(layer).__name__
            if name not in _PLAIN_LAYER_TYPES:
                raise KVMigrationError(f"layer {i} is a {name}, whose tensors are not plain keys and values at "
                                       f"positions 0..S-1; it cannot be transformed (supported: "
                                       f"{', '.join(_PLAIN_LAYER_TYPES)})")

    def replace(self, pairs: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        for layer, kv in zip(self._layers(), pairs):
            if kv is not None:
                layer.keys, layer.values = kv

    def seq_length(self) -> int:
        cache = self._ref()
        return int(cache.get_seq_length()) if cache is not None else 0

    def drop(self) -> None:
        cache = self._ref()
        if cache is not None:
            cache.reset()


class TensorCacheRef(CacheRef):
    kind = "tensors"

    def __init__(self, pairs: Sequence[Any], head_axis: int, seq_axis: int):
        refs = []
        for i, kv in enumerate(pairs):
            if not (isinstance(kv, (tuple, list)) and len(kv) == 2
                    and all(isinstance(t, torch.Tensor) for t in kv)):
                raise KVCacheError(f"layer {i}: expected a (K, V) pair of tensors, got {type(kv).__name__}")
            k, v = kv
            if k.shape != v.shape:
                raise KVCacheError(f"layer {i}: K has shape {tuple(k.shape)} but V has {tuple(v.shape)}")
            if k.dim() != 4:
                raise KVCacheError(f"layer {i}: K has {k.dim()} dims; need 4 (batch, heads, sequence, head_dim "
                                   "in the order given by head_axis and seq_axis, head_dim last)")
            refs.append((weakref.ref(k), weakref.ref(v)))
        if not refs:
            raise KVCacheError("no (K, V) pairs to register")
        ndim = pairs[0][0].dim()
        axes = {head_axis % ndim, seq_axis % ndim}
        if len(axes) != 2 or ndim - 1 in axes:
            raise KVCacheError(f"head_axis={head_axis} and seq_axis={seq_axis} must be two different axes other "
                               f"than the last (head_dim) of {ndim}-dim tensors")
        self._refs = refs
        self.head_axis, self.seq_axis = head_axis % ndim, seq_axis % ndim

    def alive(self) -> bool:
        return all(k() is not None and v() is not None for k, v in self._refs)

    def get(self) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        pairs = [(k(), v()) for k, v in self._refs]
        return None if any(k is None or v is None for k, v in pairs) else pairs  # type: ignore[misc]

    def pairs(self) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
        got = self.get()
        if got is None:
            raise KVCacheError("a registered cache tensor was garbage collected")
        return list(got)

    def replace(self, pairs: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        for (k, v), kv in zip(self.pairs(), pairs):  # type: ignore[misc]
            if kv is not None:
                k.data, v.data = kv

    def seq_length(self) -> int:
        got = self.get()
        return int(got[0][0].shape[self.seq_axis]) if got else 0


def make_ref(cache: Any, head_axis: int = 1, seq_axis: int = 2) -> CacheRef:
    if is_hf_cache(cache):
        return HFCacheRef(cache)
    if isinstance(cache, (list, tuple)):
        return TensorCacheRef(cache, head_axis, seq_axis)
    raise KVCacheError(f"cannot register a {type(cache).__name__}: pass a transformers Cache (e.g. DynamicCache) "
                       "or a list of per-layer (K, V) tensor pairs")
