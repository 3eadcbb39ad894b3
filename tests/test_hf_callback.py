"""HotweightsCallback inside a real HF Trainer run, with the receiver in its own process."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import require, run_python
from tests.procs.spawn import Proc

RECEIVER = r"""
import json, sys
from transformers import GPT2Config, GPT2LMHeadModel
from hotweights_trainer import WeightReceiver, SyncConfig
from hotweights_trainer.verify import weights_digest
torch_seed = 123
import torch; torch.manual_seed(torch_seed)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
with WeightReceiver(sys.argv[1], model=model, config=SyncConfig(timeout_s=60)) as rx:
    print(json.dumps({"ready": True}), flush=True)
    v = 0
    while rx.step is None or rx.step < int(sys.argv[2]):
        v = rx.wait_for_version(v + 1)
        print(json.dumps({"version": v, "step": rx.step}), flush=True)
    print(json.dumps({"final": weights_digest(model)}), flush=True)
"""


@pytest.mark.parametrize("async_publish", [False, True])
def test_trainer_callback_end_to_end(endpoint, tmp_path, async_publish):
    """Same rules with and without async_publish: the callback pushes through the StepPusher that
    Accelerate and DeepSpeed use, so async_publish takes effect the same way in all three."""
    require("hf")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hotweights_trainer import HotweightsCallback, SyncConfig
    from hotweights_trainer.verify import weights_digest

    steps = 6
    script = tmp_path / "rx.py"
    script.write_text(RECEIVER)
    rx = Proc([str(script), endpoint, str(steps)])
    try:
        assert rx.next()["ready"]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
        data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(64)]
        cfg = SyncConfig(timeout_s=60, async_publish=async_publish)
        cb = HotweightsCallback(endpoint, every_n_steps=2, config=cfg)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=steps,
                                 per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
                                 save_strategy="no", disable_tqdm=True, learning_rate=1e-3)

        class WaitForReceiver(HotweightsCallback.__mro__[1]):  # TrainerCallback
            def on_train_begin(self, args, state, control, **kw):
                cb.publisher.wait_for_receivers(1)

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, WaitForReceiver()])
        trainer.train()
        # Pushes at steps 2, 4, 6: one per every_n_steps optimizer steps, never per micro-batch.
        assert [r.step for r in cb.results] == [2, 4, 6]
        assert [r.version for r in cb.results] == [1, 2, 3] and cb.errors == []
        assert cb.pusher.is_main and cb.pusher.async_pushes == (3 if async_publish else 0)
        logged = [h for h in trainer.state.log_history if "hotweights/version" in h]
        if not async_publish:  # asynchronous pushes are logged once they finished: a later log line
            assert [h["hotweights/version"] for h in logged] == [1, 2, 3]
            # Delta sync (on by default) makes later pushes smaller; each logs its own byte count.
            assert [h["hotweights/bytes"] for h in logged] == [r.bytes_sent for r in cb.results]
        else:
            assert logged and all(h["hotweights/version"] in (1, 2, 3) for h in logged)
        final = None
        while final is None:
            msg = rx.next()
            final = msg.get("final")
        assert final == weights_digest(model)
    finally:
        rx.kill()


def test_callback_rejects_bad_every_n():
    require("hf")
    from hotweights_trainer import ConfigError, HotweightsCallback

    with pytest.raises(ConfigError):
        HotweightsCallback("shm://x", every_n_steps=0)


def test_demo_command_runs_and_is_bit_exact():
    require("hf")
    proc = run_python(["-m", "hotweights_trainer", "demo", "--steps", "3", "--json"], timeout=180)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["ok"] is True and len(out["rows"]) == 3
    assert all(r["bit_exact"] for r in out["rows"])
    assert [r["version"] for r in out["rows"]] == [1, 2, 3]


def test_cli_help_lists_demo():
    proc = run_python(["-m", "hotweights_trainer", "--help"])
    assert "demo" in proc.stdout
