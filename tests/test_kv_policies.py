"""KV-cache policies on a tiny Llama-style model built from a config (fp32, CPU).

Each transform is checked against recomputing the cache under the new version: RoPE (theta and
scaling), head remaps (compact and expanded caches), dtype; plus drop, keep, bad maps, weak refs.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from tests.conftest import require

require("hf")

from hotweights_trainer import SyncConfig  # noqa: E402
from hotweights_trainer.errors import ConfigError, KVCacheError, KVMigrationError  # noqa: E402
from hotweights_trainer.kv import (DropPolicy, KeepPolicy, KVRegistry, MigratePolicy, RecomputePolicy,  # noqa: E402
                                   make_policy, migrate_cache)
from tests.procs.kv_model import VOCAB, build, expand_kv_heads, permute_kv_heads, prefill  # noqa: E402


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def assert_cache_close(got, want, atol: float, rtol: float = 0.0) -> None:
    assert len(got.layers) == len(want.layers)
    for i, (a, b) in enumerate(zip(got.layers, want.layers)):
        assert a.keys.dtype == b.keys.dtype and a.keys.shape == b.keys.shape, i
        torch.testing.assert_close(a.keys, b.keys, atol=atol, rtol=rtol, msg=f"K of layer {i}")
        torch.testing.assert_close(a.values, b.values, atol=atol, rtol=rtol, msg=f"V of layer {i}")


def next_logits(model, ids, cache) -> torch.Tensor:
    """Logits of the step that feeds the last token of ``ids`` into a cache holding the others."""
    assert cache.get_seq_length() == ids.shape[1] - 1
    logits, _ = prefill(model, ids[:, -1:], cache)
    return logits[:, -1]


def full_logits(model, ids) -> torch.Tensor:
    logits, _ = prefill(model, ids)
    return logits[:, -1]


def set_rope(model, **rope) -> None:
    """Switch the model to other RoPE parameters (what a context-extension version does)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.config.rope_parameters = {"rope_theta": model.config.rope_parameters["rope_theta"], **rope}
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)


# ------------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},                         # theta change
    {"rope_type": "linear", "factor": 4.0},                                   # position interpolation
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # scaling != 1
], ids=["theta", "linear", "yarn"])
def test_rope_migrate_equals_recompute_under_new_rope(rope):
    # One layer: the keys depend on the positions only through the rotation, so a full recompute
    # under the new RoPE is the exact reference.
    model = build(1, num_hidden_layers=1)
    ids = tokens()
    _, cache = prefill(model, ids)
    registry = KVRegistry(model)
    entry = registry.register(cache, ids)
    set_rope(model, **rope)
    report = registry.apply(MigratePolicy(), 1)
    assert report.transforms == {"rope": 1} and entry.state == "migrated" and not report.failures
    _, want = prefill(model, ids)
    assert_cache_close(cache, want, atol=2e-6)
    # A second version with unchanged RoPE leaves the keys alone.
    before = snapshot(cache)
    assert registry.apply(MigratePolicy(), 2).transforms == {}
    assert all(torch.equal(k, layer.keys) for (k, _), layer in zip(before, cache.layers))


def test_rope_migrate_every_layer_matches_new_rotation_of_its_own_keys():
    # With several layers, deeper layers' inputs were computed under the old RoPE: migration
    # re-rotates each layer's own pre-rotation keys, which is checked here with the model's own
    # apply_rotary_pos_emb on keys captured from k_proj.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build(2, num_hidden_layers=3)
    cfg = model.config
    ids = tokens(length=20)
    raw: list[torch.Tensor] = []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: raw.append(o.detach()))
             for layer in model.model.layers]
    _, cache = prefill(model, ids)
    for h in hooks:
        h.remove()
    registry = KVRegistry(model)
    registry.register(cache, ids)
    set_rope(model, rope_type="default", rope_theta=1e6)
    registry.apply(MigratePolicy(), 1)
    cos, sin = model.model.rotary_emb(raw[0], torch.arange(ids.shape[1]).unsqueeze(0))
    for layer, k in zip(cache.layers, raw):
        k = k.view(ids.shape[0], ids.shape[1], cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        want, _ = apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(layer.keys, want, atol=2e-6, rtol=0)


def test_length_dependent_rope_is_refused_and_the_cache_dropped():
    model = build(3, num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                           "rope_theta": 10000.0})
    ids = tokens()
    _, cache = prefill(model, ids)
    registry = KVRegistry(model)
    entry = registry.register(cache, ids)
    set_rope(model, rope_type="dynamic", factor=4.0)
    report = registry.apply(MigratePolicy(), 1)
    assert entry.dropped and "dynamic" in entry.reason and len(report.failures) == 1
    assert cache.get_seq_length() == 0 and len(registry) == 0


# ------------------------------------------------------------------------------------ head remap
def test_head_remap_compact_cache_of_a_model_with_permuted_kv_heads():
    model = build(4, num_attention_heads=8, num_key_value_heads=4)
    perm = [2, 0, 3, 1]
    permuted = permute_kv_heads(model.state_dict(), model.config, perm)
    ids = tokens(length=10)
    reference = build(4, num_attention_heads=8, num_key_value_heads=4)
    reference.load_state_dict(permuted)
    torch.testing.assert_close(full_logits(reference, ids), full_logits(model, ids), atol=1e-5, rtol=0)

    _, cache = prefill(model, ids[:, :-1])
    registry = KVRegistry(model)  # engine order: grouped
    entry = registry.register(cache, ids, head_order="interleaved")  # computed in the checkpoint's order
    model.load_state_dict(permuted)  # the new version: KV heads permuted
    report = registry.apply(MigratePolicy(head_map=perm), 1)
    assert report.transforms == {"heads": 1} and entry.head_order == "grouped"
    _, recomputed = prefill(model, ids[:, :-1])
    assert_cache_close(cache, recomputed, atol=1e-6)
    torch.testing.assert_close(next_logits(model, ids, cache), full_logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("source,target", [("grouped", "interleaved"), ("interleaved", "grouped")])
def test_expanded_cache_converted_between_orders_by_the_derived_map(source, target):
    gqa = build(5)  # H=8, KvH=2: caches with repeated KV heads hold 8 heads
    cfg = gqa.config
    ids = tokens(length=10)
    engine = build(5, num_key_value_heads=8)  # stores one K/V per query head
    engine.load_state_dict(expand_kv_heads(gqa.state_dict(), cfg, source))
    torch.testing.assert_close(full_logits(engine, ids), full_logits(gqa, ids), atol=1e-5, rtol=0)
    _, cache = prefill(engine, ids[:, :-1])
    assert cache.layers[0].keys.shape[1] == 8

    registry = KVRegistry(engine, head_counts=(8, 2), head_order=target)
    entry = registry.register(cache, ids, head_order=source)
    engine.load_state_dict(expand_kv_heads(gqa.state_dict(), cfg, target))  # the new version's order
    report = registry.apply(MigratePolicy(head_order=target), 1)
    assert report.transforms == {"heads": 1} and entry.head_order == target
    _, recomputed = prefill(engine, ids[:, :-1])
    assert_cache_close(cache, recomputed, atol=1e-6)
    torch.testing.assert_close(next_logits(engine, ids, cache), full_logits(engine, ids), atol=1e-5, rtol=0)


def test_compact_cache_needs_no_remap_for_an_order_change():
    model = build(6)
    ids = tokens()
    _, cache = prefill(model, ids)
    before = snapshot(cache)
    registry = KVRegistry(model)
    registry.register(cache, ids, head_order="interleaved")
    assert registry.apply(MigratePolicy(head_order="grouped"), 1).transforms == {}
    assert all(torch.equal(k, layer.keys) for (k, _), layer in zip(before, cache.layers))


# ------------------------------------------------------------------------------------------ dtype
def test_dtype_fp32_to_bf16_matches_a_bf16_recompute():
    model = build(7)
    ids = tokens(length=16)
    _, cache = prefill(model, ids[:, :-1])
    registry = KVRegistry(model)
    registry.register(cache, ids)
    model.to(torch.bfloat16)  # the new version serves in bf16
    report = registry.apply(MigratePolicy(), 1)
    # model.to() also rounds the rotary inv_freq buffer to bf16, so the new version's angles differ
    # slightly and the keys are re-rotated as well.
    assert report.transforms == {"dtype": 1, "rope": 1}
    assert all(layer.keys.dtype == torch.bfloat16 == layer.values.dtype for layer in cache.layers)
    _, recomputed = prefill(model, ids[:, :-1])
    assert_cache_close(cache, recomputed, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(next_logits(model, ids, cache).float(), full_logits(model, ids).float(),
                               atol=5e-2, rtol=5e-2)


def test_explicit_kv_dtype_on_plain_tensors_changes_them_in_place():
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    pairs = [(k, v)]
    registry = KVRegistry(head_counts=(8, 2))
    registry.register(pairs, list(range(5)))
    registry.apply(MigratePolicy(kv_dtype="float16"), 1)
    assert pairs[0][0] is k and k.dtype == torch.float16 and v.dtype == torch.float16


# ------------------------------------------------------------------------------- drop and keep
def test_drop_invalidates_and_frees_every_cache():
    model = build(8)
    registry = KVRegistry(model)
    caches, entries = [], []
    for seed in range(2):
        ids = tokens(seed=seed)
        _, cache = prefill(model, ids)
        caches.append(cache)
        entries.append(registry.register(cache, ids))
    report = registry.apply(DropPolicy(), 1)
    assert report.states == {"dropped": 2}
    assert all(e.dropped and not e.stale for e in entries)
    assert all(c.get_seq_length() == 0 for c in caches)
    assert len(registry) == 0


def test_keep_leaves_caches_untouched_marks_them_stale_and_logs_once_per_version(caplog):
    model = build(9)
    registry = KVRegistry(model)
    caches, entries = [], []
    for seed in range(2):
        ids = tokens(seed=seed)
        _, cache = prefill(model, ids)
        caches.append(cache)
        entries.append(registry.register(cache, ids))
    before = [snapshot(c) for c in caches]
    with caplog.at_level(logging.INFO, logger="hotweights_trainer.kv"):
        for version in (1, 2):
            report = registry.apply(KeepPolicy(), version)
            assert report.states == {"kept": 2}
    keep_logs = [r for r in caplog.records if "kv_policy=keep" in r.getMessage()]
    assert len(keep_logs) == 2 and "version 1" in keep_logs[0].getMessage()
    assert all(e.stale and not e.dropped and e.version == 0 for e in entries)
    for snap, cache in zip(before, caches):
        assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values)
                   for (k, v), layer in zip(snap, cache.layers))
    assert len(registry) == 2


# ------------------------------------------------------------------------------------- recompute
def test_recompute_plain_tensor_cache_in_its_own_layout():
    gqa = build(10)
    ids = tokens(length=9)
    _, hf_cache = prefill(gqa, ids)
    # [batch, seq, heads, head_dim] with KV heads repeated (interleaved): an engine's own layout
    pairs = [(layer.keys.repeat(1, 4, 1, 1).transpose(1, 2).contiguous(),
              layer.values.repeat(1, 4, 1, 1).transpose(1, 2).contiguous()) for layer in hf_cache.layers]
    originals = [k for k, _ in pairs]
    registry = KVRegistry(gqa)
    entry = registry.register(pairs, ids, head_axis=2, seq_axis=1, head_order="interleaved")
    new = build(11)
    gqa.load_state_dict(new.state_dict())
    registry.apply(RecomputePolicy(), 1)
    assert entry.state == "fresh" and entry.version == 1
    _, want = prefill(new, ids)
    for (k, v), layer, original in zip(pairs, want.layers, originals):
        assert k is original  # changed in place: the engine's references stay valid
        torch.testing.assert_close(k, layer.keys.repeat(1, 4, 1, 1).transpose(1, 2), atol=1e-6, rtol=0)
        torch.testing.assert_close(v, layer.values.repeat(1, 4, 1, 1).transpose(1, 2), atol=1e-6, rtol=0)


def test_recompute_without_enough_token_ids_drops_with_a_reason():
    model = build(12)
    ids = tokens(length=10)
    _, cache = prefill(model, ids)
    registry = KVRegistry(model)
    entry = registry.register(cache, ids[:, :4])
    registry.apply(RecomputePolicy(), 1)
    assert entry.dropped and "entry.extend" in entry.reason


# ---------------------------------------------------------------------------------- bad input
def test_bad_maps_raise_and_change_nothing():
    model = build(13)  # H=8, KvH=2: a compact cache holds 2 heads
    ids = tokens()
    _, cache = prefill(model, ids)
    keys = [layer.keys for layer in cache.layers]
    before = snapshot(cache)
    for bad, words in (([0, 1, 2, 3, 4, 5, 6, 7], "stores 2 heads"),   # sized to the query heads
                       ([1, 1], "not a permutation"), ([0, 2], "outside"), ([], "empty"), ([0.0, 1.0], "integers")):
        with pytest.raises(KVMigrationError, match=words):
            migrate_cache(cache, head_map=bad, dtype=torch.bfloat16)
        assert all(layer.keys is k for layer, k in zip(cache.layers, keys))
        assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values) and layer.keys.dtype == torch.float32
                   for (k, v), layer in zip(before, cache.layers))


def test_bad_map_inside_a_policy_run_drops_only_that_cache():
    model = build(14)
    ids = tokens()
    _, cache = prefill(model, ids)
    registry = KVRegistry(model)
    entry = registry.register(cache, ids, head_order="interleaved")
    registry.apply(MigratePolicy(head_map=list(range(8))), 1)  # an expanded-cache map for a compact cache
    assert entry.dropped and "stores 2 heads" in entry.reason


def test_policy_configuration_errors(tmp_path):
    model = build(15)
    registry = KVRegistry(model)
    with pytest.raises(ConfigError, match="HOTWEIGHTS_KV_ALLOW_TRANSFORMS"):
        make_policy("migrate", SyncConfig(), registry)
    with pytest.raises(ConfigError, match="needs a model"):
        make_policy("recompute", SyncConfig(), KVRegistry())
    with pytest.raises(ConfigError, match="kv_policy must be one of"):
        make_policy("evict", SyncConfig(), registry)
    allow = dict(kv_policy="migrate", kv_allow_transforms=True)
    for cfg, words in ((SyncConfig(kv_head_map="[0, 1, 2]", **allow), "3 entries"),
                       (SyncConfig(kv_head_map="[0, 0]", **allow), "not a permutation"),
                       (SyncConfig(kv_head_map="{", **allow), "not valid JSON"),
                       (SyncConfig(kv_head_map_file=str(tmp_path / "missing.json"), **allow), "cannot read")):
        with pytest.raises(KVMigrationError, match=words):
            make_policy(None, cfg, registry)
    (tmp_path / "map.json").write_text("[1, 0]")
    policy = make_policy(None, SyncConfig(kv_head_map_file=str(tmp_path / "map.json"), **allow), registry)
    assert isinstance(policy, MigratePolicy) and policy.head_map == [1, 0]
    with pytest.raises(KVMigrationError, match="do not divide"):
        KVRegistry(head_counts=(8, 3))
    with pytest.raises(KVCacheError, match="DynamicCache"):
        registry.register(object(), [1, 2])
    with pytest.raises(KVCacheError, match="4"):
        registry.register([(torch.zeros(2, 3), torch.zeros(2, 3))], [1, 2])


# ------------------------------------------------------------------------------- weak references
def test_registry_does_not_keep_caches_alive():
    model = build(16)
    registry = KVRegistry(model)
    ids = tokens()
    _, cache = prefill(model, ids)
    entry = registry.register(cache, ids)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    registry.register([(k, v)], [[1, 2, 3, 4]])
    assert len(registry) == 2
    ref = weakref.ref(cache)
    del cache, k, v
    gc.collect()
    assert ref() is None and entry.cache is None
    assert len(registry) == 0
    assert registry.apply(DropPolicy(), 1).states == {}


def test_unsupported_layer_types_are_refused_untouched():
    from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

    cache = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=4)])
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cache.update(k, v, 0)
    keys = cache.layers[0].keys
    with pytest.raises(KVMigrationError, match="DynamicSlidingWindowLayer"):
        migrate_cache(cache, dtype=torch.bfloat16, head_map=[1, 0])
    assert cache.layers[0].keys is keys and keys.dtype == torch.float32
    # Nothing to change is not an error.
    assert migrate_cache(cache, dtype=torch.float32) == []
