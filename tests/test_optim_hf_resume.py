"""A real HF Trainer run: save a checkpoint, change some weights in it, resume under each policy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import require, run_python

SWAPPED = ["transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.bias"]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def train(out_dir, max_steps, endpoint, *, resume=None, policy=None, probe=None):
    from transformers import Trainer, TrainingArguments

    from hotweights_trainer import HotweightsCallback, SyncConfig

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (16,), generator=g),
             "labels": torch.randint(0, 64, (16,), generator=g)} for _ in range(64)]
    cb = HotweightsCallback(endpoint, config=SyncConfig(timeout_s=30, linger_s=0), opt_policy=policy, opt_attenuation=0.5)
    args = TrainingArguments(output_dir=str(out_dir), use_cpu=True, report_to=[], max_steps=max_steps,
                             per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                             logging_steps=1, disable_tqdm=True, learning_rate=1e-3, seed=0)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=data,
                      callbacks=[cb] + ([probe] if probe is not None else []))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def swap_weights(checkpoint) -> None:
    """Change two tensors in the checkpoint's model file, as a rollback or a pushed-back fix would."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = checkpoint / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(5)
    for name in SWAPPED:
        tensors[name] = tensors[name] + 0.05 * torch.randn(tensors[name].shape, generator=g)
    save_file(tensors, str(path), metadata=meta)


def state_by_name(optimizer, model) -> dict[str, dict[str, torch.Tensor]]:
    inner = getattr(optimizer, "optimizer", optimizer)
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: {k: v.clone() for k, v in inner.state.get(p, {}).items()}
            for g in inner.param_groups for p in g["params"]}


def saved_state(checkpoint, optimizer, model) -> dict[str, dict[str, torch.Tensor]]:
    """optimizer.pt keys state by position in the param groups; map positions to names."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for g in inner.param_groups for p in g["params"]]
    name_of = {id(p): n for n, p in model.named_parameters()}
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    return {name_of[id(params[pos])]: saved["state"][i] for pos, i in enumerate(ids)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require("hf")
    root = tmp_path_factory.mktemp("hf_resume")
    from hotweights_trainer.optim import read_sidecar
    from hotweights_trainer.verify import tensor_digest

    trainer, cb = train(root / "run", 3, f"shm://t-optbase-{root.name[-8:]}")
    ckpt = root / "run" / "checkpoint-3"
    sidecar = read_sidecar(ckpt)
    assert (sidecar.step, sidecar.version) == (3, cb.results[-1].version)
    params = dict(trainer.model.named_parameters())
    assert set(sidecar.tensors) == set(params)
    assert all(sidecar.tensors[n].digest == tensor_digest(p) for n, p in params.items())
    swap_weights(ckpt)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["preserve", "reset", "attenuate"])
def test_resume_applies_policy_to_changed_weights_only(checkpoint, tmp_path, policy):
    from transformers import TrainerCallback

    run = tmp_path / "run"
    shutil.copytree(checkpoint / "run", run)
    seen: dict = {}

    class Probe(TrainerCallback):  # runs after HotweightsCallback: sees the state the policy left
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            seen["after"] = state_by_name(optimizer, model)
            seen["saved"] = saved_state(run / "checkpoint-3", optimizer, model)

    trainer, cb = train(run, 4, f"shm://t-opt{policy}-{tmp_path.name[-8:]}", resume=str(run / "checkpoint-3"),
                        policy=policy, probe=Probe())
    after, saved = seen["after"], seen["saved"]
    assert set(after) == set(saved) and len(after) > 10
    for name, old in saved.items():
        new = after[name]
        if name not in SWAPPED or policy == "preserve":
            assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old), name
        elif policy == "reset":
            assert new == {}, name  # first-sight state: AdamW re-creates it on the next step
        else:
            assert torch.equal(new["step"], old["step"]), name
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[k], old[k] * 0.5), (name, k)

    report = cb.opt_report
    n = len(after)
    counts = {"preserve": (n, 0, 0), "reset": (n - 2, 0, 2), "attenuate": (n - 2, 2, 0)}[policy]
    assert (report.preserved, report.attenuated, report.reset) == counts
    assert sorted(report.updated) == sorted(SWAPPED) and report.unmapped == []
    logged = [h for h in trainer.state.log_history if "hotweights/opt_updated" in h]
    assert len(logged) == 1 and logged[0]["step"] == 3
    assert (logged[0]["hotweights/opt_preserved"], logged[0]["hotweights/opt_attenuated"],
            logged[0]["hotweights/opt_reset"]) == counts
    # Training went on for one more step on that state (no KeyError, finite loss).
    assert trainer.state.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] == 4]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    if policy == "reset":
        inner = trainer.optimizer.optimizer
        params = dict(trainer.model.named_parameters())
        assert all(float(inner.state[params[n]]["step"]) == 1.0 for n in SWAPPED)


@pytest.mark.slow
def test_opt_check_previews_the_real_checkpoint(checkpoint):
    ckpt = str(checkpoint / "run" / "checkpoint-3")
    out = json.loads(run_python(["-m", "hotweights_trainer", "opt-check", "--checkpoint", ckpt,
                                 "--policy", "attenuate", "--json"]).stdout)
    assert out["updated_names"] == sorted(SWAPPED)
    assert out["attenuated"] == 2 and out["step"] == 3 and out["missing"] == []


def test_resume_without_sidecar_leaves_state_and_warns(checkpoint, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(checkpoint / "run", run)
    (run / "checkpoint-3" / "hotweights_sidecar.json").unlink()
    with caplog.at_level("WARNING", logger="hotweights_trainer.integrations.hf_trainer"):
        trainer, cb = train(run, 3, f"shm://t-optnone-{tmp_path.name[-8:]}", resume=str(run / "checkpoint-3"),
                            policy="reset")
    assert cb.opt_report is None
    assert any("no hotweights sidecar" in r.getMessage() for r in caplog.records)
