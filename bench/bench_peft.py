"""PEFT / LoRA benchmark: bytes and time per push of a LoRA-trained Llama, in each way it can travel.

A Llama of about 100 M parameters (bf16 base, built locally with random init) gets LoRA r=16 on the
attention projections (peft keeps the adapters in float32). Each push follows one real optimizer step
of the adapters, and goes over shm:// to a receiver in its own process:

  * ``merged dense``  -- peft_mode=merged, delta=off: every tensor under the base model's names;
  * ``merged delta``  -- peft_mode=merged, delta=auto: after the first push only changed elements
    (the LoRA'd projections change wholly, everything else not at all);
  * ``adapter``       -- peft_mode=adapter: the adapter tensors only, to a receiver holding the PeftModel;
  * ``no PEFT``       -- reference: the same base model without LoRA (full fine-tuning of nothing),
    delta=off, so the cost of merging shows in the ``gather ms`` column (the merge runs while the
    publisher reads its source).

Compared against what other libraries do to publish a LoRA model: merge the adapters into the trainer's
weights, send, unmerge (the time of merge + unmerge alone, and how many frozen bf16 elements are no
longer what they were after those pushes), and against one memcpy of the bytes each mode sends.
Run: ``python bench/bench_peft.py [--layers 10] [--pushes 3] [--quick]``. Absolute numbers on shared machines are
noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver  # noqa: E402
from hotweights_trainer.verify import combined_digest, weights_digest  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256)


def build(layers: int, seed: int, lora: bool) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(layers)).to(torch.bfloat16)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    return model


def receiver_proc(endpoint: str, layers: int, lora: bool, pushes: int, delta: str, mode: str, out) -> None:
    model = build(layers, seed=1, lora=lora)
    cfg = SyncConfig(timeout_s=300, delta=delta, peft_mode=mode)
    with WeightReceiver(endpoint, model=model, config=cfg) as rx:
        out.put(("ready",))
        for v in range(1, pushes + 1):
            rx.wait_for_version(v)
            out.put(("applied", v, rx.last_apply_seconds, combined_digest(weights_digest(model))))


def memcpy_seconds(nbytes: int) -> float:
    from bench_core import memcpy_gbps  # one memcpy reference for every benchmark

    return nbytes / (memcpy_gbps(nbytes) * 1e9) if nbytes else 0.0


def train_step(model, opt, g: torch.Generator) -> None:
    ids = torch.randint(0, 16000, (1, 32), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def run_mode(label: str, mode: str, delta: str, layers: int, pushes: int, lora: bool = True) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    endpoint = f"shm://bench-peft-{os.getpid()}-{mode}-{delta}"
    p = ctx.Process(target=receiver_proc, args=(endpoint, layers, mode == "adapter", pushes, delta, mode, q),
                    daemon=True)
    p.start()
    model = build(layers, seed=0, lora=lora)
    if not lora:  # reference: train only the norms, so there is a step and the sizes match
        for name, t in model.named_parameters():
            t.requires_grad_("norm" in name)
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    rows = []
    with WeightPublisher(endpoint, config=SyncConfig(timeout_s=300, delta=delta, peft_mode=mode)) as pub:
        q.get(timeout=300)
        pub.wait_for_receivers(1, timeout=300)
        for v in range(1, pushes + 1):
            train_step(model, opt, g)
            res = pub.publish(model, step=v)
            _, _, apply_s, digest = q.get(timeout=300)
            rows.append({"label": label, "push": v, "bytes": res.bytes_sent, "dense": res.dense_bytes,
                         "tensors": res.tensors_sent, "seconds": res.seconds, "apply": apply_s,
                         "gather": res.phases["gather"],
                         "memcpy": memcpy_seconds(res.bytes_sent)})
    if mode == "merged" and lora:  # the receiver must hold exactly what peft's merge_and_unload() gives
        rows[-1]["exact"] = digest == combined_digest(weights_digest(copy.deepcopy(model).merge_and_unload()))
    p.join(60)
    return rows


def merge_unmerge_baseline(layers: int, pushes: int) -> dict:
    """Other libraries' way: merge into the weights, (send), unmerge; what it costs and what it drifts."""
    model = build(layers, seed=0, lora=True)
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    frozen = {n: t.detach().clone() for n, t in model.named_parameters() if not t.requires_grad}
    times = []
    for _ in range(pushes):
        train_step(model, opt, g)
        t = time.perf_counter()
        model.merge_adapter()
        model.unmerge_adapter()
        times.append(time.perf_counter() - t)
    params = dict(model.named_parameters())
    drifted = sum(int((params[n].detach() != t).sum()) for n, t in frozen.items())
    total = sum(t.numel() for t in frozen.values())
    return {"seconds": statistics.median(times), "drifted": drifted, "total": total}


def merge_compute_ms(layers: int) -> dict[int, float]:
    """Median time to produce every merged tensor (no transport), with torch's default threads and with one.

    On a busy machine torch's intra-op pool stalls (the publisher shares the cores with the receiver
    verifying buckets): the ``gather ms`` column above includes such stalls.
    """
    from hotweights_trainer.peft_sync import PeftView
    from hotweights_trainer.source import module_tensors

    model = build(layers, seed=0, lora=True)
    default = torch.get_num_threads()
    out = {}
    try:
        for threads in sorted({default, 1}, reverse=True):
            torch.set_num_threads(threads)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _item in PeftView(model, "merged").items(module_tensors(model)):
                    pass
                times.append(time.perf_counter() - t)
            out[threads] = statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(default)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10, help="decoder layers (10: ~96 M parameters)")
    ap.add_argument("--pushes", type=int, default=3, help="optimizer steps, one push after each")
    ap.add_argument("--quick", action="store_true", help="smoke-sized run (2 layers, 2 pushes); numbers mean nothing")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.pushes = 2, 2
    probe = build(args.layers, seed=0, lora=True)
    n_params = sum(t.numel() for t in probe.get_base_model().parameters() if not t.requires_grad)
    n_adapter = sum(t.numel() for t in probe.parameters() if t.requires_grad)
    del probe
    print(f"# LoRA r=16 on {', '.join(TARGETS)} of a {n_params / 1e6:.1f} M-parameter Llama (bf16 base, "
          f"{n_adapter / 1e6:.2f} M float32 adapter parameters); {args.pushes} pushes per mode over shm://, "
          f"one AdamW step before each; torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    rows = []
    rows = run_mode("no PEFT (reference)", "merged", "off", args.layers, args.pushes, lora=False)
    for label, mode, delta in (("merged dense", "merged", "off"), ("merged delta", "merged", "auto"),
                               ("adapter", "adapter", "auto")):
        rows += run_mode(label, mode, delta, args.layers, args.pushes)
    print("| mode | push | tensors | MB sent | dense MB | publish ms | of which gather ms | memcpy of sent bytes ms |"
          " receiver apply ms | bit-exact vs merge_and_unload |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        exact = {True: "yes", False: "NO"}.get(r.get("exact"), "")
        print(f"| {r['label']} | {r['push']} | {r['tensors']} | {r['bytes'] / 1e6:.2f} | {r['dense'] / 1e6:.2f} | "
              f"{r['seconds'] * 1e3:.1f} | {r['gather'] * 1e3:.1f} | {r['memcpy'] * 1e3:.2f} | {r['apply'] * 1e3:.1f} | "
              f"{exact} |")
    base = merge_unmerge_baseline(args.layers, args.pushes)
    print(f"\nMerge + unmerge in place (what other libraries do around a send): {base['seconds'] * 1e3:.1f} ms per "
          f"push before sending anything; after {args.pushes} pushes {base['drifted']:,} of {base['total']:,} "
          f"frozen bf16 elements ({base['drifted'] / base['total']:.2%}) differ from their original bits. "
          "Merged sync above leaves them untouched.")
    compute = merge_compute_ms(args.layers)
    print("Computing the merged tensors alone (no transport), median of 5: " +
          ", ".join(f"{ms:.1f} ms with {n} torch thread(s)" for n, ms in compute.items()) + ".")


if __name__ == "__main__":
    main()
