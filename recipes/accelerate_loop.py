"""Recipe: a custom Accelerate training loop with ``AccelerateSync``.

Launch::

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/accelerate_loop.py   # 2 CPU processes
    accelerate launch --config_file recipes/accelerate_gpu.yaml recipes/accelerate_loop.py   # one per GPU

``sync.after_step(model)`` right after ``optimizer.step()`` pushes on real optimizer steps only (not
inside gradient accumulation); ``--wrap-optimizer`` makes ``optimizer.step()`` push on its own instead.
The same script runs under DeepSpeed through Accelerate (``--use_deepspeed --deepspeed_config_file
recipes/ds_zero3.json``), ZeRO-3 included. Rank 0 starts ``inference_receiver.py``, which checks
bit-exactness with the trainer's final weights; the exit status is non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from _common import (build_model, default_endpoint, exit_launched, final_digests, make_batches, rank,
                     report_and_check, shutdown_distributed, start_receiver)


def main() -> int:
    ap = argparse.ArgumentParser(description="Accelerate loop + AccelerateSync recipe")
    ap.add_argument("--endpoint", default=None, help="shm://NAME (default: unique per run)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--every-n", type=int, default=1, help="push every N optimizer steps")
    ap.add_argument("--wrap-optimizer", action="store_true", help="push from optimizer.step() itself")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (e.g. recipes/ds_zero3.json)")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from accelerate import Accelerator, DeepSpeedPlugin

    from hotweights_trainer import SyncConfig
    from hotweights_trainer.integrations.accelerate import AccelerateSync
    from hotweights_trainer.integrations.gather import is_sharded

    # cpu=True without a GPU: otherwise every process believes it is rank 0 of 1.
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed) if args.deepspeed else None
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and plugin is None,
                              gradient_accumulation_steps=args.grad_accum,
                              deepspeed_plugin=plugin)

    model = build_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    world = accelerator.num_processes
    samples = make_batches(args.steps * args.grad_accum * args.micro_batch * world, 1)
    loader = torch.utils.data.DataLoader([{k: v[0] for k, v in b.items()} for b in samples],
                                         batch_size=args.micro_batch)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    workdir = Path(tempfile.mkdtemp(prefix="hotweights-recipe-"))
    endpoint, receiver = args.endpoint, None
    if rank() == 0:  # torch.distributed's rank: under DeepSpeed Accelerate says 0 on every rank
        endpoint = endpoint or default_endpoint()
        receiver = start_receiver(endpoint, workdir / "final.json", args.timeout)
    cfg = SyncConfig.from_env(timeout_s=min(args.timeout, 60.0))
    sync = AccelerateSync(accelerator, endpoint or "shm://unused-off-rank-0", every_n_steps=args.every_n,
                          config=cfg)
    sync.wait_for_receivers(1, timeout=args.timeout)  # rank 0 only
    if args.wrap_optimizer:
        optimizer = sync.wrap_optimizer(optimizer, model)

    micro_steps = 0
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            if not args.wrap_optimizer:
                sync.after_step(model)
            optimizer.zero_grad()
        micro_steps += 1
    sync.push_final(model)  # the last weights, unless that step was already pushed

    digests = final_digests(accelerator.unwrap_model(model))  # every rank: ZeRO-3 gathers are collective
    status = 0
    if rank() == 0:
        summary = {"micro_steps": micro_steps, "optimizer_steps": sync.optimizer_steps,
                   "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized()
                   else 1,
                   "accelerate_num_processes": world,
                   "sharded": is_sharded(accelerator.unwrap_model(model)),
                   "deepspeed": accelerator.state.deepspeed_plugin is not None}
        status = report_and_check(sync, summary, digests=digests, expect=workdir / "final.json",
                                  receiver=receiver, timeout_s=args.timeout)
    sync.close()
    shutdown_distributed()
    return status


if __name__ == "__main__":
    exit_launched(main())
