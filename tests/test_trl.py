"""HotweightsCallback inside TRL's GRPOTrainer (a Trainer subclass, generating in-process): one push
per optimizer step, never per generation or micro-batch, and a receiver process bit-exact at the end."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require
from tests.procs.spawn import Proc

pytestmark = [pytest.mark.slow,
              # TRL warns about the vLLM version installed next to it; this test generates in-process.
              pytest.mark.filterwarnings("ignore:TRL currently supports vLLM:UserWarning")]

WORDS = "a b c d e f g h".split()
MODEL = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=len(WORDS) + 2, n_positions=32, bos_token_id=1,
             eos_token_id=1, pad_token_id=0)

RECEIVER = r"""
import json, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from hotweights_trainer import SyncConfig, WeightReceiver
from hotweights_trainer.verify import weights_digest
torch.manual_seed(99)  # other weights than the trainer's: only the sync can make them equal
model = GPT2LMHeadModel(GPT2Config(**json.loads(sys.argv[2])))
with WeightReceiver(sys.argv[1], model=model, config=SyncConfig(timeout_s=60)) as rx:
    print(json.dumps({"ready": True}), flush=True)
    steps = []
    while rx.step is None or rx.step < int(sys.argv[3]):
        rx.wait_for_version(rx.version + 1)
        steps.append(rx.step)
    print(json.dumps({"steps": steps, "final": weights_digest(model)}), flush=True)
"""


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def count_a(completions, **kwargs):
    return [float(c.split().count("a")) for c in completions]


def test_grpo_trainer_pushes_once_per_optimizer_step(endpoint, tmp_path):
    require("hf")
    require("trl")
    import json

    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    from hotweights_trainer import HotweightsCallback, SyncConfig
    from hotweights_trainer.verify import weights_digest

    steps = 3
    script = tmp_path / "rx.py"
    script.write_text(RECEIVER)
    rx = Proc([str(script), endpoint, json.dumps(MODEL), str(steps)])
    try:
        assert rx.next()["ready"]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**MODEL))
        initial = weights_digest(model)
        prompts = Dataset.from_dict({"prompt": [" ".join(WORDS[i % 8:i % 8 + 2]) for i in range(32)]})
        cb = HotweightsCallback(endpoint, config=SyncConfig(timeout_s=60, min_receivers=1))
        args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=steps,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                          max_completion_length=6, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                          disable_tqdm=True, seed=0)
        trainer = GRPOTrainer(model=model, reward_funcs=count_a, args=args, train_dataset=prompts,
                              processing_class=tiny_tokenizer(), callbacks=[cb])
        trainer.train()
        assert trainer.state.global_step == steps
        # One push per optimizer step (2 micro-batches each), none at the end: the last step was pushed.
        assert [r.step for r in cb.results] == [1, 2, 3] and [r.version for r in cb.results] == [1, 2, 3]
        assert all(r.receivers == 1 for r in cb.results)
        got = rx.next(timeout=60)
        assert got["steps"] == [1, 2, 3]
        assert got["final"] == weights_digest(model) != initial
        assert rx.wait() == 0
    finally:
        rx.kill()
