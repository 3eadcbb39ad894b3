"""LoRA merged sync under DeepSpeed ZeRO-3 on two real ranks: bit-exact, memory bounded by buckets.

Run by tests/test_peft.py as ``torchrun --nproc_per_node 2 tests/procs/zero3_peft.py ...`` with
``MALLOC_MMAP_THRESHOLD_`` set (see tests/procs/memprobe.py). Rank 0 starts two plain-Llama
receivers (tests/procs/peft_receiver.py): one follows the pushes ``attach`` makes after each step
(delta sync, default auto), one a dense push whose peak memory is measured. The reference is peft's
own ``merge_and_unload()`` of an unsharded copy of the gathered model. Every rank prints one line
``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

LLAMA = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4)
LORA = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def reference(engine, rank: int):
    """(digest of merge_and_unload() of an unsharded copy, the gathered state dict) on rank 0."""
    import deepspeed

    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.peft_models import llama, with_lora

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
    if rank != 0:
        return None, None
    copy = with_lora(llama(seed=0, **LLAMA), **LORA)
    copy.load_state_dict(state, strict=True)
    return combined_digest(weights_digest(copy.merge_and_unload())), state


def split_layers(groups) -> int:
    """LoRA layers whose base weight and factors ended up in different gather groups."""
    where = {name: i for i, g in enumerate(groups) for name, _ in g}
    bad = 0
    for name, i in where.items():
        if name.endswith(".base_layer.weight"):
            layer = name[:-len(".base_layer.weight")]
            bad += any(where.get(f"{layer}.{f}.default.weight", i) != i for f in ("lora_A", "lora_B"))
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bucket-mb", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args()

    import deepspeed

    from hotweights_trainer import SyncConfig
    from hotweights_trainer.integrations import gather
    from hotweights_trainer.integrations.deepspeed import attach
    from hotweights_trainer.integrations.pusher import StepPusher
    from tests.procs.memprobe import PeakMemory, watch_gathers
    from tests.procs.peft_models import llama, with_lora
    from tests.procs.spawn import Proc

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = with_lora(llama(seed=0, **LLAMA), **LORA)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=ds_config)
    ep_delta, ep_dense = args.endpoint + "-d", args.endpoint + "-f"
    rx = {}
    if rank == 0:
        common = ["--kind", "plain", "--llama", json.dumps(LLAMA), "--timeout", str(args.timeout)]
        rx = {"delta": Proc(["-m", "tests.procs.peft_receiver", "--endpoint", ep_delta, "--versions", "3", *common]),
              "dense": Proc(["-m", "tests.procs.peft_receiver", "--endpoint", ep_dense, "--versions", "1", *common])}
        assert all(p.next(args.timeout)["ready"] for p in rx.values())
    sync = attach(engine, ep_delta, config=SyncConfig(bucket_mb=args.bucket_mb, timeout_s=args.timeout))
    # Dense: the delta encoder's snapshots (two host copies of what is sent, its documented cost) would
    # hide what is measured here, the memory of gathering and merging.
    dense = StepPusher(ep_dense, config=SyncConfig(bucket_mb=args.bucket_mb, timeout_s=args.timeout, delta="off"))
    sync.wait_for_receivers(1, timeout=args.timeout)
    dense.wait_for_receivers(1, timeout=args.timeout)
    _, before = reference(engine, rank)

    torch.manual_seed(rank)
    delta_exact, delta_versions = [], []
    for _ in range(3):
        ids = torch.randint(0, LLAMA["vocab_size"], (2, 16))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()  # hooked: pushes the merged weights (delta sync after the first)
        expected, _ = reference(engine, rank)
        if rank == 0:
            got = rx["delta"].next(args.timeout)
            delta_versions.append(got.get("version"))
            delta_exact.append(got.get("digests", {}).get("all") == expected)

    probes: list = []
    seen = watch_gathers(lambda: [p.probe() for p in probes])
    ours = PeakMemory()
    probes.append(ours)
    with ours:
        dense.push(engine.module, step=engine.global_steps)
    probes.clear()
    stats = seen[-1].stats
    expected, after = reference(engine, rank)
    result = {"rank": rank, "model_bytes": model_bytes, "bucket_bytes": args.bucket_mb << 20,
              "ours_extra": ours.extra_bytes, "live_bytes_high": stats.live_bytes_high,
              "groups": stats.groups, "lora_layers_split": split_layers(seen[-1].groups),
              "sharded": gather.is_sharded(engine.module)}
    if rank == 0:
        result["delta_versions"] = delta_versions
        result["delta_bit_exact"] = delta_exact
        result["dense_bit_exact"] = rx["dense"].next(args.timeout).get("digests", {}).get("all") == expected
        result["frozen_unchanged"] = all(torch.equal(before[n], after[n]) for n in frozen)
        result["later_delta_smaller"] = sync.results[-1].bytes_sent < 0.5 * sync.results[0].bytes_sent
        for p in rx.values():
            p.wait(args.timeout)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: both ranks share stdout
    sys.stdout.flush()
    sync.close()
    dense.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
