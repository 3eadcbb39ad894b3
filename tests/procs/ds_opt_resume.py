"""DeepSpeed ZeRO resume with swapped weights, run under ``torchrun --nproc_per_node 2``.

For each ``--zero STAGE:CASES``, in one launch: phase 1 trains a small model for a few steps, saves a
DeepSpeed checkpoint and the hotweights sidecar. Then, for each case, a fresh engine loads the
checkpoint, some weights are swapped in (the same values on every rank), ``apply_on_resume`` runs, and
one more step is taken. Rank 0 prints one JSON line per case with what it measured; the test asserts
on those numbers.

With ``--push PREFIX`` phase 1 also runs under ``attach(..., async_publish=True)`` (the push path the
HF callback and Accelerate share) and reports, as case ``push``, what was pushed and whether the HF
callback's ``on_save`` writes a sidecar for this model under each policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from hotweights_trainer import SyncConfig
from hotweights_trainer.optim import apply_on_resume, write_sidecar

SWAPPED = ["0.weight", "2.weight", "4.bias"]  # rank 0, split across both, rank 1
LR = 1e-3


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 5))  # odd sizes: uneven ZeRO-3 partitions


def engine_for(stage: int):
    model = make_model()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def batch(step: int):
    g = torch.Generator().manual_seed(1000 * step + torch.distributed.get_rank())
    return torch.randn(4, 16, generator=g), torch.randn(4, 5, generator=g)


def train_step(engine, step: int) -> None:
    x, y = batch(step)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()


class Full:
    """Full (gathered) views of a parameter, its fp32 master and moments; collectives on every rank."""

    def __init__(self, engine):
        self.engine = engine
        self.params = dict(engine.module.named_parameters())

    def weight(self, name):
        p = self.params[name]
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().clone()
        return p.detach().clone()

    def master(self, name):
        return safe_get_full_fp32_param(self.params[name]).clone()

    def moment(self, name, key):
        return safe_get_full_optimizer_state(self.params[name], key).clone()

    def swap(self, name, value):
        p = self.params[name]
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(value)
        else:
            p.data.copy_(value)


def link_fragments(engine) -> None:
    """DeepSpeed links optimizer-state fragments at the first step after a load; the test's full views
    need them earlier (the library links the ones it touches by itself)."""
    lazy = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if lazy is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        lazy()


def run_case(stage: int, ckpt: str, case: str, old: dict, moments: dict) -> dict:
    engine = engine_for(stage)
    engine.load_checkpoint(ckpt, tag="base")
    full = Full(engine)
    names = list(full.params)
    g = torch.Generator().manual_seed(7)
    swapped_names = names if case == "reset_all" else SWAPPED
    new = {n: old[n] + 0.5 + 0.1 * torch.randn(old[n].shape, generator=g) for n in swapped_names}
    for n in swapped_names:
        full.swap(n, new[n])
    policy = {"reset_all": "reset", "control": None}.get(case, case)
    report = None
    if policy is not None:
        report = apply_on_resume(engine.module, engine.optimizer, os.path.join(ckpt, "base"), policy=policy,
                                 attenuation=0.25, config=SyncConfig())
    out: dict = {"case": case, "stage": stage, "report": report.to_dict() if report else None, "params": {}}
    link_fragments(engine)
    after_policy = {n: {k: full.moment(n, k) for k in ("exp_avg", "exp_avg_sq")} for n in names}
    masters = {n: full.master(n) for n in names}
    train_step(engine, 100)
    for n in names:
        w = full.weight(n)
        row = {
            "swapped": n in new,
            "master_equals_weights": bool(torch.equal(masters[n], (new[n] if n in new else old[n]).float())),
            # After one more step a weight lies within a few lr of where it started.
            "dist_from_new": float((w - new[n]).abs().max()) if n in new else None,
            "dist_from_old": float((w - old[n]).abs().max()),
        }
        for k in ("exp_avg", "exp_avg_sq"):
            before, now = moments[n][k], after_policy[n][k]
            row[k] = {"zero": bool(torch.count_nonzero(now) == 0), "equal": bool(torch.equal(now, before)),
                      "scaled": bool(torch.allclose(now, before * 0.25, rtol=1e-6, atol=0)),
                      "nonzero_before": bool(torch.count_nonzero(before) > 0)}
        out["params"][n] = row
    base = engine.optimizer.optimizer
    out["steps"] = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    engine.destroy()
    return out


def callback_saves_sidecar(engine, directory: str, policy: str) -> bool:
    """Whether the HF callback's ``on_save`` writes a sidecar for this engine's model under ``policy``
    (every rank calls it, as the Trainer does)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hotweights_trainer.integrations.hf_trainer import HotweightsCallback
    from hotweights_trainer.optim import SIDECAR_NAME

    out = os.path.join(directory, f"hf-{policy}")
    os.makedirs(os.path.join(out, "checkpoint-3"), exist_ok=True)
    callback = HotweightsCallback("shm://never-bound", opt_policy=policy, config=SyncConfig(linger_s=0))
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[])
    callback.on_save(args, TrainerState(global_step=3), TrainerControl(), model=engine.module)
    torch.distributed.barrier()
    return os.path.isfile(os.path.join(out, "checkpoint-3", SIDECAR_NAME))


def run_stage(stage: int, cases: list[str], directory: str, push: str | None) -> None:
    """Phase 1 (with the push, when asked) for one ZeRO stage, then each resume case; rank 0 prints."""
    rank = torch.distributed.get_rank()
    engine = engine_for(stage)
    sync = None
    if push:
        from hotweights_trainer.integrations.deepspeed import attach

        # skip: the final push then runs on every rank while only rank 0 knows whether it sends.
        sync = attach(engine, push, config=SyncConfig(async_publish=True, staleness_policy="skip",
                                                      linger_s=0, timeout_s=60))
    for s in range(3):
        train_step(engine, s)
    if sync is not None:
        final = sync.push_final()
        sync.close()
        written = {policy: callback_saves_sidecar(engine, directory, policy)
                   for policy in ("preserve", "reset")}
        if rank == 0:
            print(json.dumps({"case": "push", "stage": stage, "async_pushes": sync.async_pushes,
                              "errors": len(sync.errors), "pushed_steps": [r.step for r in sync.results],
                              "versions": [r.version for r in sync.results], "final": final is not None,
                              "sidecar_written": written}), flush=True)
    engine.save_checkpoint(directory, tag="base")
    write_sidecar(os.path.join(directory, "base"), engine.module, step=3, is_main=rank == 0)
    full = Full(engine)  # the saved weights and moments, as every resumed engine loads them
    old = {n: full.weight(n) for n in full.params}
    moments = {n: {k: full.moment(n, k) for k in ("exp_avg", "exp_avg_sq")} for n in full.params}
    torch.distributed.barrier()
    engine.destroy()
    for case in cases:
        result = run_case(stage, directory, case, old, moments)
        if rank == 0:
            print(json.dumps(result), flush=True)
    torch.distributed.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", action="append", required=True, metavar="STAGE:CASES",
                    help="a ZeRO stage and its comma-separated cases (reset, attenuate, preserve, reset_all, "
                         "control); repeat for several stages in one launch")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--push", default=None,
                    help="endpoint prefix: phase 1 of each stage pushes its steps, asynchronously, "
                         "to PREFIX-sSTAGE")
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    # Several stages share one launch: starting the ranks costs more than everything they run here.
    for spec in args.zero:
        stage, _, cases = spec.partition(":")
        run_stage(int(stage), [c for c in cases.split(",") if c], os.path.join(args.dir, f"zero{stage}"),
                  f"{args.push}-s{stage}" if args.push else None)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is reported. Leave without interpreter teardown: torch's gloo threads, destroyed at
    # exit, sometimes end a rank with "terminate called without an active exception" (SIGABRT),
    # also after destroy_process_group; that is torch's teardown, not what this test checks.
    os._exit(code)
