"""Recipe: Hugging Face Trainer + HotweightsCallback + an inference receiver process.

Launch (CPU or GPU)::

    python recipes/trainer_callback.py
    torchrun --nproc_per_node 2 recipes/trainer_callback.py --deepspeed recipes/ds_zero3.json

The trainer pushes its weights after every optimizer step (``--every-n``) to ``shm://NAME``; rank 0
starts ``inference_receiver.py``, which applies each version and, after training, checks bit-exactness
against the trainer's final weights. The exit status is the receiver's: non-zero on any mismatch.
With ``--deepspeed`` the same callback, unchanged, runs on every rank; under ZeRO-3 all ranks take part
in the bucket-sized gathers and rank 0 sends.
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
    ap = argparse.ArgumentParser(description="HF Trainer + HotweightsCallback recipe")
    ap.add_argument("--endpoint", default=None, help="shm://NAME (default: unique per run)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps")
    ap.add_argument("--every-n", type=int, default=1, help="push every N optimizer steps")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (launch with torchrun)")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    on_cpu = not torch.cuda.is_available()

    if args.deepspeed:
        import deepspeed

        # On CPU the process group must exist (gloo) before TrainingArguments sees the DeepSpeed
        # config, or Trainer computes the world size as 1 and trips DeepSpeed's batch-size check.
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hotweights_trainer import HotweightsCallback, SyncConfig
    from hotweights_trainer.integrations.gather import is_sharded

    workdir = Path(tempfile.mkdtemp(prefix="hotweights-recipe-"))
    cfg = SyncConfig.from_env(timeout_s=min(args.timeout, 60.0))
    receiver = None
    endpoint = args.endpoint
    if rank() == 0:
        endpoint = endpoint or default_endpoint()
        receiver = start_receiver(endpoint, workdir / "final.json", args.timeout)
    # Keep publishing until the receiver has checked the final version (closed explicitly below).
    sync = HotweightsCallback(endpoint or "shm://unused-off-rank-0", every_n_steps=args.every_n, config=cfg,
                              close_on_train_end=False)

    class WaitForInference(TrainerCallback):
        """Start training once the inference process is connected, so it sees every version."""

        def on_train_begin(self, a, state, control, **kw):
            if sync.publisher is not None:
                sync.publisher.wait_for_receivers(1, timeout=args.timeout)

    model = build_model(seed=0)
    data = make_batches(args.steps * args.grad_accum * 2, 1)
    data = [{k: v[0] for k, v in b.items()} for b in data]
    targs = TrainingArguments(
        output_dir=str(workdir / "out"), use_cpu=on_cpu, report_to=[], max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        deepspeed=args.deepspeed)
    trainer = Trainer(model=model, args=targs, train_dataset=data,
                      callbacks=[sync, WaitForInference()])
    trainer.train()

    digests = final_digests(trainer.model)  # every rank: ZeRO-3 gathers are collective
    status = 0
    if rank() == 0:
        last = sync.last_result
        summary = {"optimizer_steps": trainer.state.global_step,
                   "last_push_ms": round(last.seconds * 1e3, 2), "bytes": last.bytes_sent,
                   "sharded": is_sharded(trainer.model), "deepspeed": bool(args.deepspeed),
                   "world_size": targs.world_size}
        status = report_and_check(sync, summary, digests=digests, expect=workdir / "final.json",
                                  receiver=receiver, timeout_s=args.timeout)
    sync.close()
    shutdown_distributed()
    return status


if __name__ == "__main__":
    exit_launched(main())
