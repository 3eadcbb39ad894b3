"""KV policies through a real WeightReceiver: a publisher process sends a new version while the
test process holds a KV cache in the middle of a generation."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from tests.conftest import require

require("hf")

from transformers import DynamicCache  # noqa: E402

from hotweights_trainer import SyncConfig, WeightReceiver  # noqa: E402
from hotweights_trainer.errors import KVMigrationError  # noqa: E402
from tests.procs.kv_model import VOCAB, build, greedy, permute_kv_heads, prefill  # noqa: E402
from tests.procs.spawn import Proc  # noqa: E402

TIMEOUT = 30.0


@contextlib.contextmanager
def publisher(endpoint: str, state: dict[str, torch.Tensor], tmp_path):
    """A publisher process that sends ``state`` as version 1 once a receiver is connected.

    Open the receiver inside this block: the publisher exits by itself once the receiver closed.
    """
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    proc = Proc(["-m", "tests.procs.kv_publisher", "--endpoint", endpoint, "--weights", str(path),
                 "--timeout", str(TIMEOUT)])
    try:
        yield proc
        assert proc.wait(TIMEOUT) == 0, proc.stderr()
    finally:
        proc.kill()


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(seed))


def start_generation(model, k: int = 5):
    """Generate ``k`` tokens greedily; returns (ids so far, cache holding all but the last id)."""
    cache = DynamicCache(config=model.config)
    ids, _ = greedy(model, prompt(), cache, k)
    assert cache.get_seq_length() == ids.shape[1] - 1
    return ids, cache


def copy_cache(cache) -> DynamicCache:
    other = DynamicCache()
    for i, layer in enumerate(cache.layers):
        other.update(layer.keys.clone(), layer.values.clone(), i)
    return other


def receive_one_version(rx: WeightReceiver, pub: Proc) -> None:
    """Apply version 1 (the policy runs inside this pause)."""
    assert rx.wait_for_version(1, timeout=TIMEOUT) == 1
    assert pub.next(TIMEOUT) == {"version": 1}


def test_recompute_continuation_equals_fresh_generation_under_the_new_weights(endpoint, tmp_path):
    model = build(1)
    new_state = build(2).state_dict()
    with publisher(endpoint, new_state, tmp_path) as pub, \
            WeightReceiver(endpoint, model=model, kv_policy="recompute", config=SyncConfig(timeout_s=TIMEOUT)) as rx:
        ids, cache = start_generation(model)
        entry = rx.kv.register(cache, ids)
        stale = copy_cache(cache)
        receive_one_version(rx, pub)
    assert entry.state == "fresh" and entry.version == 1 and rx.kv.last_report.states == {"fresh": 1}
    continued, logits = greedy(model, ids, cache, 8)
    fresh, fresh_logits = greedy(model, ids, DynamicCache(config=model.config), 8)
    assert continued.tolist() == fresh.tolist()  # token for token
    for a, b in zip(logits, fresh_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The stale cache would not have given these logits: the check above is not vacuous.
    _, stale_logits = greedy(model, ids, stale, 1)
    assert (stale_logits[0] - fresh_logits[0]).abs().max() > 1e-2


def test_drop_policy_invalidates_the_cache(endpoint, tmp_path):
    model = build(3)
    with publisher(endpoint, build(4).state_dict(), tmp_path) as pub, \
            WeightReceiver(endpoint, model=model, config=SyncConfig(timeout_s=TIMEOUT)) as rx:  # default: drop
        ids, cache = start_generation(model)
        entry = rx.kv.register(cache, ids)
        receive_one_version(rx, pub)
    assert entry.dropped and cache.get_seq_length() == 0 and len(rx.kv) == 0


def test_keep_policy_serves_the_old_cache_and_logs_it(endpoint, tmp_path, caplog):
    model = build(5)
    with caplog.at_level(logging.INFO, logger="hotweights_trainer.kv"), \
            publisher(endpoint, build(6).state_dict(), tmp_path) as pub, \
            WeightReceiver(endpoint, model=model, kv_policy="keep", config=SyncConfig(timeout_s=TIMEOUT)) as rx:
        ids, cache = start_generation(model)
        entry = rx.kv.register(cache, ids)
        before = copy_cache(cache)
        receive_one_version(rx, pub)
    assert entry.stale and entry.version == 0 and rx.version == 1
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(cache.layers, before.layers))
    assert sum("kv_policy=keep" in r.getMessage() for r in caplog.records) == 1


def test_migrate_from_environment_remaps_a_permuted_checkpoint(endpoint, tmp_path):
    model = build(7, num_key_value_heads=4)
    perm = [2, 0, 3, 1]
    permuted = permute_kv_heads(model.state_dict(), model.config, perm)
    cfg = SyncConfig.from_env({"HOTWEIGHTS_KV_POLICY": "migrate", "HOTWEIGHTS_KV_ALLOW_TRANSFORMS": "1",
                               "HOTWEIGHTS_KV_HEAD_MAP": "[2, 0, 3, 1]"}, timeout_s=TIMEOUT)
    with publisher(endpoint, permuted, tmp_path) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        ids, cache = start_generation(model)
        entry = rx.kv.register(cache, ids, head_order="interleaved")
        receive_one_version(rx, pub)
    assert entry.state == "migrated" and rx.kv.last_report.transforms == {"heads": 1}
    logits, _ = prefill(model, ids[:, -1:], cache)
    want, _ = prefill(model, ids)
    torch.testing.assert_close(logits[:, -1], want[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_map,words", [("[0, 1, 2]", "3 entries"), ("[1, 1]", "not a permutation")])
def test_receiver_with_an_invalid_map_raises_before_it_connects(endpoint, head_map, words):
    model = build(8)
    cfg = SyncConfig(kv_policy="migrate", kv_allow_transforms=True, kv_head_map=head_map, timeout_s=TIMEOUT)
    with pytest.raises(KVMigrationError, match=words):
        WeightReceiver(endpoint, model=model, config=cfg)
