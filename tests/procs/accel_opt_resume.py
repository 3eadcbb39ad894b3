"""Accelerate resume: ``save_state``, later ``load_state``, weights swapped, ``apply_on_resume``, one step.

Plain (one process, ``python script.py``) or with a DeepSpeed ZeRO-2 plugin (``torchrun --nproc_per_node 2
script.py --deepspeed``). Prints one JSON line (rank 0) with what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from hotweights_trainer import SyncConfig
from hotweights_trainer.optim import apply_on_resume, write_sidecar

SWAPPED = ["0.weight", "2.bias"]
LR = 1e-3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--policy", default="reset")
    ap.add_argument("--deepspeed", action="store_true")
    args = ap.parse_args()
    from accelerate import Accelerator

    plugin = None
    if args.deepspeed:
        import deepspeed
        from accelerate.utils import DeepSpeedPlugin

        deepspeed.init_distributed(dist_backend="gloo")
        plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1)
        plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8,
                                        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    # Accelerate turns DeepSpeed off under cpu=True; without a GPU it still runs on the CPU when asked
    # for DeepSpeed explicitly (ACCELERATE_USE_DEEPSPEED, set by the test).
    accelerator = Accelerator(cpu=plugin is None, deepspeed_plugin=plugin)
    if plugin is not None:
        assert accelerator.distributed_type == "DEEPSPEED", accelerator.distributed_type
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model, opt = accelerator.prepare(model, opt)

    def step(seed: int) -> None:
        g = torch.Generator().manual_seed(seed * 10 + rank)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()

    for s in range(3):
        step(s)
    accelerator.save_state(args.dir)
    net = accelerator.unwrap_model(model)
    write_sidecar(args.dir, net, step=3, is_main=rank == 0)
    accelerator.wait_for_everyone()
    params = dict(net.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    for s in range(3, 5):  # the run goes on and changes weights and moments; then we resume
        step(s)
    accelerator.load_state(args.dir)
    restored = all(torch.equal(params[n], saved[n]) for n in params)
    g = torch.Generator().manual_seed(9)
    new = {n: saved[n] + 0.5 + 0.1 * torch.randn(saved[n].shape, generator=g) for n in SWAPPED}
    with torch.no_grad():
        for n in SWAPPED:
            params[n].copy_(new[n])  # the weights a hot swap / rollback / merged adapter put in place
    report = apply_on_resume(net, opt, args.dir, policy=args.policy, attenuation=0.5, config=SyncConfig())
    step(100)
    out = {"restored": restored, "report": report.to_dict(), "dist_from_new": {}, "dist_from_old": {}}
    for n, p in params.items():
        out["dist_from_old"][n] = float((p.detach() - saved[n]).abs().max())
        if n in new:
            out["dist_from_new"][n] = float((p.detach() - new[n]).abs().max())
    if not args.deepspeed:
        inner = opt.optimizer
        out["steps"] = {n: float(inner.state[p]["step"]) for n, p in params.items()}
    if rank == 0:
        print(json.dumps(out), flush=True)
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is reported. Leave without interpreter teardown: torch's gloo threads, destroyed at
    # exit, sometimes end a rank with "terminate called without an active exception" (SIGABRT),
    # also after destroy_process_group; that is torch's teardown, not what this test checks.
    os._exit(code)
