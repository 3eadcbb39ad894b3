"""ZeRO-3 push on two real ranks: bucket-sized gathers vs gathering the whole model, peak memory of each.

Run by tests/test_deepspeed.py as ``torchrun --nproc_per_node 2 tests/procs/zero3_memory.py ...`` with
``MALLOC_MMAP_THRESHOLD_`` set (see tests/procs/memprobe.py). Every rank prints one line
``RESULT {json}``. With ``--receiver`` the script is instead the inference process: it follows the
endpoint and prints ``{"version", "digest"}`` per applied version.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def make_model(layers: int, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def receiver(args: argparse.Namespace) -> int:
    from hotweights_trainer import HotweightsError, SyncConfig, WeightReceiver
    from hotweights_trainer.verify import combined_digest, weights_digest

    model = make_model(args.layers, args.width, seed=99)
    with WeightReceiver(args.endpoint, model=model, config=SyncConfig(timeout_s=args.timeout)) as rx:
        print(json.dumps({"ready": True}), flush=True)
        for _ in range(args.versions):
            try:
                v = rx.wait_for_version(rx.version + 1)
            except HotweightsError as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
                return 3
            print(json.dumps({"version": v, "digest": combined_digest(weights_digest(model))}), flush=True)
    return 0


def trainer(args: argparse.Namespace) -> int:
    import deepspeed

    from hotweights_trainer import SyncConfig
    from hotweights_trainer.integrations import gather
    from hotweights_trainer.integrations.deepspeed import attach
    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.memprobe import PeakMemory, watch_gathers
    from tests.procs.spawn import Proc

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = make_model(args.layers, args.width, seed=0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "steps_per_print": 10**6,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    # Dense sends: the delta encoder's snapshots (two host copies of the model on the sending rank, its
    # documented cost) would hide what is measured here, the memory of gathering.
    cfg = SyncConfig(bucket_mb=args.bucket_mb, timeout_s=args.timeout, delta="off")
    rx = None
    if rank == 0:
        rx = Proc([__file__, "--receiver", "--endpoint", args.endpoint, "--layers", str(args.layers),
                   "--width", str(args.width), "--versions", "3", "--timeout", str(args.timeout)])
        assert rx.next(args.timeout)["ready"]
    sync = attach(engine, args.endpoint, config=cfg)
    sync.wait_for_receivers(1, timeout=args.timeout)

    x = torch.randn(2, args.width)
    engine.backward(engine(x).pow(2).mean())
    engine.step()  # hooked: pushes version 1 (also warms buffers and shared memory)

    probes: list[PeakMemory] = []
    seen = watch_gathers(lambda: [p.probe() for p in probes])
    ours = PeakMemory()
    probes.append(ours)
    with ours:
        sync.push()  # version 2, measured
    probes.clear()
    stats = seen[-1].stats

    everything = PeakMemory()
    with everything:  # the hand-written alternative: gather the whole model, then publish it
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            everything.probe()
            if rank == 0:
                sync.publisher.publish(engine.module, step=engine.global_steps)

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        expected = combined_digest(weights_digest(engine.module)) if rank == 0 else None
    result = {"rank": rank, "model_bytes": model_bytes, "bucket_bytes": cfg.bucket_bytes,
              "ours_extra": ours.extra_bytes, "everything_extra": everything.extra_bytes,
              "live_bytes_high": stats.live_bytes_high, "group_bytes_max": stats.group_bytes_max,
              "groups": stats.groups, "pushes": len(sync.results),
              "sharded": gather.is_sharded(engine.module)}
    if rank == 0:
        got = [rx.next(args.timeout) for _ in range(3)]
        result["receiver_versions"] = [g.get("version") for g in got]
        result["bit_exact"] = all(g.get("digest") == expected for g in got)
        rx.wait(args.timeout)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: both ranks share stdout
    sys.stdout.flush()
    sync.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--receiver", action="store_true")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--bucket-mb", type=int, default=4)
    ap.add_argument("--versions", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    return receiver(args) if args.receiver else trainer(args)


if __name__ == "__main__":
    sys.exit(main())
