"""Recipe: a plain DeepSpeed engine loop (ZeRO-3) with ``hotweights_trainer.integrations.deepspeed.attach``.

Launch (CPU or GPU), either way::

    deepspeed --no_local_rank --num_gpus 2 recipes/deepspeed_zero3.py
    torchrun --nproc_per_node 2 recipes/deepspeed_zero3.py

``attach`` hooks ``engine.step()``: weights are pushed at gradient-accumulation boundaries every
``--every-n`` optimizer steps. Under ZeRO-3 every rank joins the bucket-sized gathers and only the
global rank 0 sends. Rank 0 starts ``inference_receiver.py``, which checks bit-exactness with the
trainer's final weights after training; the exit status is non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from _common import (HERE, build_model, default_endpoint, exit_launched, final_digests, make_batches, rank,
                     report_and_check, shutdown_distributed, start_receiver)


def load_ds_config(path: Path, micro_batch: int, grad_accum: int, stage: int | None) -> dict:
    """The JSON is shared with the HF Trainer recipe, whose "auto" values the Trainer fills in."""
    cfg = json.loads(path.read_text())
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
    if cfg.get("gradient_accumulation_steps", "auto") == "auto":
        cfg["gradient_accumulation_steps"] = grad_accum
    if stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = stage
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description="DeepSpeed ZeRO-3 engine loop recipe")
    ap.add_argument("--config", type=Path, default=HERE / "ds_zero3.json")
    ap.add_argument("--zero-stage", type=int, default=None, help="override the config's ZeRO stage")
    ap.add_argument("--endpoint", default=None, help="shm://NAME (default: unique per run)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--every-n", type=int, default=1, help="push every N optimizer steps")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import deepspeed

    from hotweights_trainer import SyncConfig
    from hotweights_trainer.integrations.deepspeed import attach
    from hotweights_trainer.integrations.gather import is_sharded

    on_cpu = not torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    ds_config = load_ds_config(args.config, args.micro_batch, args.grad_accum, args.zero_stage)

    # Build the model normally and let deepspeed.initialize partition it: building a Hugging Face
    # model inside deepspeed.zero.Init() skips its weight initialisation.
    model = build_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    workdir = Path(tempfile.mkdtemp(prefix="hotweights-recipe-"))
    endpoint, receiver = args.endpoint, None
    if rank() == 0:
        endpoint = endpoint or default_endpoint()
        receiver = start_receiver(endpoint, workdir / "final.json", args.timeout)
    cfg = SyncConfig.from_env(timeout_s=min(args.timeout, 60.0))
    sync = attach(engine, endpoint or "shm://unused-off-rank-0", every_n_steps=args.every_n, config=cfg)
    sync.wait_for_receivers(1, timeout=args.timeout)  # rank 0 only; the others wait in the first gather

    world = torch.distributed.get_world_size()
    batches = make_batches(args.steps * args.grad_accum, args.micro_batch * world)
    micro_steps = 0
    for batch in batches:
        # Each rank trains on its own slice of the global batch.
        mine = {k: v.chunk(world)[rank()].to(engine.device) for k, v in batch.items()}
        loss = engine(**mine).loss
        engine.backward(loss)
        engine.step()  # hooked: pushes at accumulation boundaries
        micro_steps += 1
    sync.push_final()  # the last weights, unless that step was already pushed

    digests = final_digests(engine.module)  # every rank: ZeRO-3 gathers are collective
    status = 0
    if rank() == 0:
        summary = {"micro_steps": micro_steps, "optimizer_steps": sync.optimizer_steps,
                   "global_steps": engine.global_steps,
                   "sharded": is_sharded(engine.module), "zero_stage": engine.zero_optimization_stage(),
                   "world_size": world}
        status = report_and_check(sync, summary, digests=digests, expect=workdir / "final.json",
                                  receiver=receiver, timeout_s=args.timeout)
    sync.close()
    shutdown_distributed()
    return status


if __name__ == "__main__":
    exit_launched(main())
