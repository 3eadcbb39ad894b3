"""Recompute a cache under the new weights: re-run the prefill of the cached prefix. Exact."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Optional

import torch

from ..errors import KVMigrationError
from .caches import CacheRef, HFCacheRef
from .heads import HeadCounts, expansion_index


@lru_cache(maxsize=64)
def _cache_kwarg(forward_cls: type) -> str:
    # transformers 5 renamed the forward argument ``past_key_values`` to ``cache``.
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefill(model: torch.nn.Module, tokens: torch.Tensor, cache: Any) -> None:
    kwarg = _cache_kwarg(type(model))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=True, **{kwarg: cache})


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prefix_tokens(token_ids: torch.Tensor, seq_len: int, batch: int) -> torch.Tensor:
    """The tokens a cache of ``seq_len`` positions was computed from."""
    if token_ids.shape[0] != batch:
        raise KVMigrationError(f"token ids have batch {token_ids.shape[0]} but the cache has batch {batch}")
    if token_ids.shape[1] < seq_len:
        raise KVMigrationError(f"the cache holds {seq_len} positions but only {token_ids.shape[1]} token ids are "
                               "registered; call entry.extend() with the generated tokens")
    return token_ids[:, :seq_len]


def recompute(ref: CacheRef, token_ids: torch.Tensor, model: torch.nn.Module, *,
              head_order: str = "grouped", counts: Optional[HeadCounts] = None) -> None:
    """Refill the cache behind ``ref`` from ``token_ids`` with ``model``'s current weights."""
    seq_len = ref.seq_length()
    if seq_len == 0:
        return
    device = _model_device(model)
    if isinstance(ref, HFCacheRef):
        cache = ref.get()
        first = next(kv for kv in ref.pairs() if kv is not None)
        tokens = prefix_tokens(token_ids, seq_len, first[0].shape[0]).to(device)
        cache.reset()
        _prefill(model, tokens, cache)
        return
    from transformers import DynamicCache  # plain tensor caches: recompute into a scratch HF cache

    old = ref.pairs()
    head_axis, seq_axis = ref.head_axis, ref.seq_axis
    batch_axis = next(a for a in range(old[0][0].dim() - 1) if a not in (head_axis, seq_axis))  # type: ignore[index]
    tokens = prefix_tokens(token_ids, seq_len, old[0][0].shape[batch_axis]).to(device)  # type: ignore[index]
    scratch = DynamicCache()
    _prefill(model, tokens, scratch)
    fresh = [(layer.keys, layer.values) for layer in scratch.layers]
    if len(fresh) != len(old):
        raise KVMigrationError(f"the model computed {len(fresh)} layers but the cache has {len(old)}")
    new_pairs = []
    for i, ((k, v), kv_old) in enumerate(zip(fresh, old)):
        assert kv_old is not None
        stored = kv_old[0].shape[head_axis]
        if counts is not None and stored != k.shape[1] and counts.layout_of(stored) == "expanded":
            idx = torch.tensor(expansion_index(counts, head_order), device=k.device)
            k, v = k.index_select(1, idx), v.index_select(1, idx)
        # scratch layout is [batch, heads, seq, head_dim]; move to the cache's declared axes
        dims = sorted(((batch_axis, 0), (head_axis, 1), (seq_axis, 2)))
        order = [src for _, src in dims]
        k = k.permute(*order, 3).to(kv_old[0].dtype)
        v = v.permute(*order, 3).to(kv_old[1].dtype)
        if k.shape != kv_old[0].shape:
            raise KVMigrationError(f"layer {i}: recomputed K has shape {tuple(k.shape)} but the cache holds "
                                   f"{tuple(kv_old[0].shape)}")
        new_pairs.append((k.contiguous(), v.contiguous()))
    ref.replace(new_pairs)
