"""Asynchronous publishing: versions equal the step boundary they claim; skip never mixes steps."""

from __future__ import annotations

import time

import pytest
import torch

from hotweights_trainer import ManifestMismatchError, SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.async_publisher import AsyncPublisher
from hotweights_trainer.source import iter_source
from hotweights_trainer.verify import weights_digest
from tests.conftest import require
from tests.procs import pause
from tests.procs.spawn import Proc, start_receiver, write_spec


def _drain(rx, until_version: int, timeout: float = 30) -> list[dict]:
    got = []
    while not got or got[-1]["version"] < until_version:
        msg = rx.next(timeout=timeout)
        assert "error" not in msg, msg
        got.append(msg)
    return got


def test_versions_equal_the_step_boundary_they_claim(endpoint):
    """A real optimizer keeps changing the weights while earlier steps are pushed in the background."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 8))
    spec = [[name, "bfloat16", list(p.shape)] for name, p in model.state_dict().items()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = SyncConfig(bucket_mb=1, timeout_s=20, send_dtype="bfloat16", async_publish=True)
    steps = 12
    rx = start_receiver(endpoint, write_spec(spec), versions=steps)
    try:
        assert rx.next()["ready"]
        with WeightPublisher(endpoint, config=cfg) as pub, AsyncPublisher(pub) as apub:
            pub.wait_for_receivers(1)
            boundary: dict[int, dict[str, str]] = {}
            for step in range(1, steps + 1):
                x = torch.randn(32, 64)
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                boundary[step] = weights_digest({n: p.to(torch.bfloat16) for n, p in model.state_dict().items()})
                assert apub.submit(model, step=step)
            apub.flush()
            assert [r.step for r in apub.results] == list(range(1, steps + 1))  # wait policy: none skipped
            assert [r.version for r in apub.results] == list(range(1, steps + 1))
            assert sum(r.delta.delta_entries for r in apub.results[1:]) > 0
        seen = _drain(rx, steps)
        for msg in seen:
            assert msg["digests"] == boundary[msg["step"]], f"version {msg['version']} is not step {msg['step']}"
        assert seen[-1]["step"] == steps
    finally:
        rx.kill()


def test_skip_never_sends_a_mixed_version(endpoint):
    """While a push is stuck, later boundaries are skipped whole, and the weights keep changing in
    place under the stuck push; every version that arrives is exactly one boundary's weights."""
    spec = [[f"w{i}", "float32", [200_000]] for i in range(6)]
    tensors = {name: torch.zeros(shape) for name, _, shape in spec}
    cfg = SyncConfig(bucket_mb=1, timeout_s=20, async_publish=True, staleness_policy="skip")
    rx = start_receiver(endpoint, write_spec(spec), versions=100, timeout=30)
    try:
        assert rx.next()["ready"]
        with WeightPublisher(endpoint, config=cfg) as pub:
            apub = AsyncPublisher(pub)
            pub.wait_for_receivers(1)
            boundary: dict[int, dict[str, str]] = {}

            def step(n: int) -> bool:
                for i, t in enumerate(tensors.values()):
                    t.add_(0.5 + i)  # every element changes, in place
                boundary[n] = weights_digest(tensors)
                return apub.submit(tensors, step=n)

            assert step(1)
            apub.flush()
            pause.stop(rx.p.pid)  # the next push cannot finish while it is stopped
            try:
                assert step(2)
                sent_while_stuck = [step(n) for n in range(3, 9)]
                assert not any(sent_while_stuck)
                assert apub.skipped_steps == list(range(3, 9))
            finally:
                pause.cont(rx.p.pid)
            apub.flush()
            assert step(9)
            apub.close()
            assert [r.step for r in apub.results] == [1, 2, 9]
            assert [r.version for r in apub.results] == [1, 2, 3]  # skipped steps leave no holes
        seen = _drain(rx, 3)
        for msg in seen:
            assert msg["digests"] == boundary[msg["step"]]
        assert seen[-1]["step"] == 9
    finally:
        pause.cont(rx.p.pid)
        rx.kill()


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_background_errors_reach_the_next_boundary(endpoint, on_error):
    cfg = SyncConfig(bucket_mb=1, timeout_s=10, async_publish=True, on_error=on_error)
    wrong = torch.nn.Linear(3, 3)  # the receiver's model does not fit what is published
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=wrong, config=cfg), \
            AsyncPublisher(pub) as apub:
        pub.wait_for_receivers(1)
        src = torch.nn.Linear(4, 4)
        assert apub.submit(src, step=1)
        deadline = time.monotonic() + 10
        while apub.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        if on_error == "raise":
            with pytest.raises(ManifestMismatchError):
                apub.submit(src, step=2)
        else:
            assert apub.submit(src, step=2)  # logged, training goes on
            apub.flush()
            assert len(apub.errors) == 2 and all(isinstance(e, ManifestMismatchError) for e in apub.errors)
        assert apub.results == []


def test_submit_after_close_and_bad_source_raise_typed_errors(endpoint):
    from hotweights_trainer import HotweightsError
    from hotweights_trainer.errors import ClosedError

    with WeightPublisher(endpoint, config=SyncConfig(timeout_s=5, linger_s=0)) as pub:
        apub = AsyncPublisher(pub)
        with pytest.raises(HotweightsError, match="expected"):
            apub.submit([("a", 3)])
        assert apub.inflight == 0  # the slot came back
        assert apub.submit({"a": torch.ones(2)}, step=1)
        apub.close()
        with pytest.raises(ClosedError):
            apub.submit({"a": torch.ones(2)})


RECEIVER = r"""
import json, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from hotweights_trainer import WeightReceiver, SyncConfig
from hotweights_trainer.verify import weights_digest
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).to(torch.bfloat16)
with WeightReceiver(sys.argv[1], model=model, config=SyncConfig(timeout_s=60)) as rx:
    print(json.dumps({"ready": True}), flush=True)
    v = 0
    while rx.step is None or rx.step < int(sys.argv[2]):
        v = rx.wait_for_version(v + 1)
        print(json.dumps({"version": v, "step": rx.step, "digests": weights_digest(model)}), flush=True)
"""


@pytest.mark.parametrize("async_publish", [False, True])
def test_trainer_callback_bf16_delta(endpoint, tmp_path, async_publish):
    """A tiny model trained for several steps with the callback: bit-exact after every version,
    and after the first full snapshot the pushes are far below dense."""
    require("hf")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from hotweights_trainer import HotweightsCallback

    steps = 6
    script = tmp_path / "rx.py"
    script.write_text(RECEIVER)
    rx = Proc([str(script), endpoint, str(steps)])
    try:
        assert rx.next()["ready"]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
        data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(64)]
        cfg = SyncConfig(timeout_s=60, send_dtype="bfloat16", async_publish=async_publish)
        cb = HotweightsCallback(endpoint, config=cfg)
        boundary: dict[int, dict[str, str]] = {}

        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                cb.publisher.wait_for_receivers(1)

            def on_step_end(self, args, state, control, model=None, **kw):
                boundary[state.global_step] = weights_digest(
                    {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in iter_source(model)})

        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=steps,
                                 per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                                 learning_rate=3e-5, bf16=True, logging_steps=1)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Record()])
        trainer.train()
        assert [r.step for r in cb.results] == list(range(1, steps + 1))
        assert cb.errors == [] and cb.pusher.async_pushes == (steps if async_publish else 0)
        for r in cb.results[1:]:
            assert r.delta.delta_entries > 0 and r.bytes_sent * 4 < r.dense_bytes
        for msg in _drain(rx, steps, timeout=60):
            assert msg["digests"] == boundary[msg["step"]], f"version {msg['version']} != step {msg['step']}"
    finally:
        rx.kill()
