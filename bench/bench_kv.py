"""KV-cache policy benchmark: what each policy costs inside the apply pause.

Part 1, transforms of one cache (``migrate_cache``), compared in the same run against:
  * memcpy of the cache (torch ``copy_`` into a pre-faulted buffer of the same size): the physical limit;
  * the hand-written torch one-liner for the same change (``.to(dtype)``, ``index_select``, an fp32
    un-rotate/re-rotate with precomputed cos/sin).
Part 2, policies over registered caches of a small Llama-style model (``KVRegistry.apply``): drop,
keep, migrate (RoPE change) and recompute (a prefill of every cached prefix).

Run: ``python bench/bench_kv.py [--layers 8] [--seq 2048] [--reps 5]``. Absolute numbers on shared
machines are noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hotweights_trainer.kv.recompute import _cache_kwarg  # noqa: E402
from hotweights_trainer.kv import (DropPolicy, KeepPolicy, KVRegistry, MigratePolicy,  # noqa: E402
                                   RecomputePolicy, RopeSnapshot, migrate_cache)


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up (allocator, first touch)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rotary(theta: float, head_dim: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 8, num_attention_heads=8, head_dim=head_dim, rope_theta=theta)
    return LlamaRotaryEmbedding(cfg)


def make_pairs(layers: int, kv_heads: int, seq: int, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, kv_heads, seq, head_dim, generator=g), torch.randn(1, kv_heads, seq, head_dim, generator=g))
            for _ in range(layers)]


def fresh(pairs):
    return [(k.clone(), v.clone()) for k, v in pairs]


def part_transforms(args) -> list[tuple[str, float, float, float]]:
    pairs = make_pairs(args.layers, args.kv_heads, args.seq, args.head_dim)
    nbytes = sum(k.nbytes + v.nbytes for k, v in pairs)
    dst = [(torch.empty_like(k), torch.empty_like(v)) for k, v in pairs]

    def memcpy():
        for (k, v), (dk, dv) in zip(pairs, dst):
            dk.copy_(k)
            dv.copy_(v)

    t_memcpy = timed(memcpy, args.reps)
    perm = list(reversed(range(args.kv_heads)))
    idx = torch.tensor(perm)
    old_rot, new_rot = rotary(10000.0, args.head_dim), rotary(500000.0, args.head_dim)
    rope_from, rope_to = RopeSnapshot([old_rot]), RopeSnapshot([new_rot])
    pos = torch.arange(args.seq).unsqueeze(0)
    probe = torch.empty(0)
    cos_o, sin_o = old_rot(probe, pos)
    cos_n, sin_n = new_rot(probe, pos)

    def rot_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def hand_rope(pairs):  # fp32, angles precomputed, un-rotate then re-rotate: the plain-torch version
        return [(cos_n * raw + sin_n * rot_half(raw), v) for raw, v in
                ((cos_o * k - sin_o * rot_half(k), v) for k, v in pairs)]

    cases = [
        ("dtype fp32->bf16", lambda p: [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in p],
         lambda p: migrate_cache(p, dtype=torch.bfloat16)),
        ("head remap", lambda p: [(k.index_select(1, idx), v.index_select(1, idx)) for k, v in p],
         lambda p: migrate_cache(p, head_map=perm)),
        ("RoPE theta 1e4->5e5", hand_rope, lambda p: migrate_cache(p, rope_from=rope_from, rope_to=rope_to)),
        ("all three", lambda p: [(k.to(torch.bfloat16).index_select(1, idx), v.to(torch.bfloat16).index_select(1, idx))
                                 for k, v in hand_rope(p)],
         lambda p: migrate_cache(p, dtype=torch.bfloat16, head_map=perm, rope_from=rope_from, rope_to=rope_to)),
    ]

    def on_copies(fn) -> float:
        # migrate_cache changes the tensors it is given: every run (hand-written ones too, so both
        # see the same memory state) gets its own copy of the cache, made outside the timed region.
        runs = []
        for _ in range(args.reps + 1):
            copy = fresh(pairs)
            t = time.perf_counter()
            out = fn(copy)
            runs.append(time.perf_counter() - t)
            del out, copy
        return statistics.median(runs[1:])

    rows = [(name, on_copies(hand), on_copies(ours), t_memcpy) for name, hand, ours in cases]
    print(f"\nPart 1: transforms of one cache: {args.layers} layers x K,V [1, {args.kv_heads}, {args.seq}, "
          f"{args.head_dim}] fp32 = {nbytes / 2**20:.0f} MiB; median of {args.reps}")
    print(f"memcpy of the cache: {t_memcpy * 1e3:.1f} ms ({nbytes / t_memcpy / 1e9:.2f} GB/s)")
    print(f"{'transform':<22} {'hand ms':>9} {'ours ms':>9} {'ours GB/s':>10} {'ours/memcpy':>12} {'ours/hand':>10}")
    for name, t_hand, t_ours, t_mem in rows:
        print(f"{name:<22} {t_hand * 1e3:>9.1f} {t_ours * 1e3:>9.1f} {nbytes / t_ours / 1e9:>10.2f} "
              f"{t_ours / t_mem:>11.1f}x {t_ours / t_hand:>9.2f}x")
    return rows


def part_policies(args) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=args.model_layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    seq = args.model_seq
    ids = torch.randint(0, cfg.vocab_size, (1, seq))

    def filled():
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{_cache_kwarg(type(model)): cache})
        return cache

    base = filled()
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in base.layers)
    rows = []
    for name in ("drop", "keep", "migrate", "recompute"):
        times = []
        for rep in range(args.reps):
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
            model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
            registry = KVRegistry(model)
            caches = [filled() for _ in range(args.caches)]
            for c in caches:
                registry.register(c, ids)
            policy = {"drop": DropPolicy(), "keep": KeepPolicy(), "recompute": RecomputePolicy(),
                      "migrate": MigratePolicy()}[name]
            if name == "migrate":  # the new version extends the context: another theta
                cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
                model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
            report = registry.apply(policy, 1)
            assert not report.failures, report.failures
            times.append(report.seconds)
        rows.append((name, statistics.median(times)))
    t_recompute = dict(rows)["recompute"]
    print(f"\nPart 2: policies in the apply pause: {args.caches} caches of a {args.model_layers}-layer Llama "
          f"(hidden 512, 8 heads / 2 KV heads), {seq} tokens each ({nbytes / 2**20:.1f} MiB per cache); "
          f"median of {args.reps}")
    print(f"{'policy':<10} {'pause ms':>9} {'vs recompute':>13}  exact?")
    exact = {"drop": "yes (prefill again later)", "keep": "no (stale)", "recompute": "yes",
             "migrate": "layout changes only"}
    for name, t in rows:
        print(f"{name:<10} {t * 1e3:>9.2f} {t / t_recompute:>12.3f}x  {exact[name]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--model-seq", type=int, default=512)
    ap.add_argument("--caches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start")
    part_transforms(args)
    part_policies(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
