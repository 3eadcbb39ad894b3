"""Tiny Llama-style models built from a config (fp32, CPU) and exact re-layouts of their weights.

``permute_kv_heads`` and ``expand_kv_heads`` produce models that compute the same function as the
original with a different KV-head layout, so a migrated cache can be compared with a recomputed one.
"""

from __future__ import annotations

from typing import Any

import torch

from hotweights_trainer.kv.heads import HeadCounts, expansion_index

VOCAB = 64


def tiny_config(**overrides: Any):
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                              rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build(seed: int, **overrides: Any):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def _attn_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".", 2)[0] for k in state if k.endswith("self_attn.q_proj.weight")})


def permute_kv_heads(state: dict[str, torch.Tensor], config: Any, perm: list[int]) -> dict[str, torch.Tensor]:
    """Same function, KV head ``j`` of the result = KV head ``perm[j]`` of ``state`` (query groups follow)."""
    counts = HeadCounts(config.num_attention_heads, config.num_key_value_heads)
    d, g = config.head_dim, counts.group_size
    out = dict(state)
    idx = torch.tensor(perm)
    for attn in _attn_keys(state):
        for proj in ("k_proj", "v_proj"):
            w = state[f"{attn}.{proj}.weight"]
            out[f"{attn}.{proj}.weight"] = w.view(counts.kv_heads, d, -1)[idx].reshape(w.shape).clone()
        q = state[f"{attn}.q_proj.weight"]
        out[f"{attn}.q_proj.weight"] = q.view(counts.kv_heads, g, d, -1)[idx].reshape(q.shape).clone()
        o = state[f"{attn}.o_proj.weight"]
        out[f"{attn}.o_proj.weight"] = o.view(o.shape[0], counts.kv_heads, g, d)[:, idx].reshape(o.shape).clone()
    return out


def expand_kv_heads(state: dict[str, torch.Tensor], config: Any, order: str) -> dict[str, torch.Tensor]:
    """Weights of an MHA model (num_key_value_heads = H) equal to the GQA model, KV heads repeated in ``order``.

    Its cache is an expanded cache in that order: slot s holds KV head ``expansion_index(order)[s]`` and
    is read by the original query head that read that KV head.
    """
    counts = HeadCounts(config.num_attention_heads, config.num_key_value_heads)
    d, g, kvh = config.head_dim, counts.group_size, counts.kv_heads
    kv_of_slot = torch.tensor(expansion_index(counts, order))
    if order == "grouped":
        q_of_slot = torch.arange(counts.heads)
    else:  # slot g * KvH + kv is read by query head kv * G + g
        q_of_slot = torch.tensor([(s % kvh) * g + s // kvh for s in range(counts.heads)])
    out = dict(state)
    for attn in _attn_keys(state):
        for proj in ("k_proj", "v_proj"):
            w = state[f"{attn}.{proj}.weight"]
            out[f"{attn}.{proj}.weight"] = w.view(kvh, d, -1)[kv_of_slot].reshape(counts.heads * d, -1).clone()
        q = state[f"{attn}.q_proj.weight"]
        out[f"{attn}.q_proj.weight"] = q.view(counts.heads, d, -1)[q_of_slot].reshape(q.shape).clone()
        o = state[f"{attn}.o_proj.weight"]
        out[f"{attn}.o_proj.weight"] = o.view(o.shape[0], counts.heads, d)[:, q_of_slot].reshape(o.shape).clone()
    return out


def prefill(model, ids: torch.Tensor, cache=None):
    """Run ``ids`` through ``model`` with ``cache`` (a fresh DynamicCache when None); returns (logits, cache)."""
    from transformers import DynamicCache

    from hotweights_trainer.kv.recompute import _cache_kwarg

    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        # the forward argument is `cache` from transformers 5.2x, `past_key_values` before
        out = model(input_ids=ids, use_cache=True, **{_cache_kwarg(type(model)): cache})
    return out.logits, cache


def greedy(model, ids: torch.Tensor, cache, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy continuation: feeds the tokens of ``ids`` the cache does not hold yet, then ``n`` more steps.

    Returns (all ids, logits of each generated token's step).
    """
    logits_seen = []
    for _ in range(n):
        start = cache.get_seq_length()
        logits, _ = prefill(model, ids[:, start:], cache)
        logits_seen.append(logits[:, -1])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids, logits_seen
