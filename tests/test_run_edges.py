"""The start and the end of a run: waiting for receivers, the final version surviving close, and
``poll()`` right after ``publish()`` applying that version (issue: a short run delivered nothing)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from hotweights_trainer import SyncConfig, SyncTimeoutError, WeightPublisher, WeightReceiver
from hotweights_trainer.errors import ClosedError
from hotweights_trainer.verify import weights_digest
from tests.conftest import require
from tests.procs.common import SpecModule, make_tensors, mixed_spec
from tests.procs.spawn import Proc, start_receiver, write_spec
from tests.redis_server import redis_server  # noqa: F401 - fixture

SPEC = mixed_spec(n_small=6, big_elems=20_000)


def test_poll_right_after_publish_applies_that_version(endpoint):
    # The contract, many times over: once publish() returned, the receiver has the commit pending,
    # so one poll() applies exactly that version, never one step late.
    cfg = SyncConfig(bucket_mb=1, timeout_s=20, delta="off")
    a, b = SpecModule(SPEC), SpecModule(SPEC)
    with WeightPublisher(endpoint, config=cfg) as pub, \
            WeightReceiver(endpoint, model=a, config=cfg) as rx_a, \
            WeightReceiver(endpoint, model=b, config=cfg) as rx_b:
        pub.wait_for_receivers(2)
        late = []
        for i in range(1, 151):
            tensors = make_tensors(SPEC, i)
            res = pub.publish(tensors, step=i)
            got = rx_a.poll(), rx_b.poll()
            if got != (res.version, res.version):
                late.append((i, got))
        assert not late, f"poll() after publish() missed the version: {late[:5]}"
        assert rx_a.version == rx_b.version == 150 and rx_a.step == 150
        assert weights_digest(a) == weights_digest(b) == weights_digest(make_tensors(SPEC, 150))


def test_first_publish_waits_for_min_receivers_and_logs_progress(endpoint, caplog):
    cfg = SyncConfig(bucket_mb=1, timeout_s=20, min_receivers=1, receiver_wait_s=60)
    tensors = make_tensors(SPEC, 1)
    rx = None
    with WeightPublisher(endpoint, config=cfg) as pub:
        def start_late() -> None:
            nonlocal rx
            time.sleep(1.0)  # the inference side is still starting when the first version is ready
            rx = start_receiver(endpoint, write_spec(SPEC), versions=1)

        starter = threading.Thread(target=start_late)
        starter.start()
        try:
            with caplog.at_level(logging.INFO, logger="hotweights_trainer.publisher"):
                t0 = time.monotonic()
                res = pub.publish(tensors, step=1)
            assert time.monotonic() - t0 > 1.0 and res.receivers == 1 and res.version == 1
            assert any("waiting for 1 receiver(s)" in r.getMessage() and endpoint in r.getMessage()
                       for r in caplog.records)
            starter.join()
            assert rx.next()["ready"] and rx.next()["digests"] == weights_digest(tensors)
        finally:
            starter.join()
            if rx is not None:
                rx.kill()


def test_min_receivers_deadline_names_the_endpoint(endpoint):
    cfg = SyncConfig(timeout_s=20, min_receivers=2, receiver_wait_s=0.4, linger_s=0)
    with WeightPublisher(endpoint, config=cfg) as pub:
        t0 = time.monotonic()
        with pytest.raises(SyncTimeoutError, match=endpoint.split("//")[1]) as info:
            pub.publish(make_tensors(SPEC, 1))
        assert 0.35 < time.monotonic() - t0 < 5
        assert "HOTWEIGHTS_MIN_RECEIVERS" in str(info.value)
        assert pub.version == 0  # nothing was sent


def test_callbacks_wait_too(endpoint):
    # Accelerate and DeepSpeed push through StepPusher, i.e. through the same publisher.
    from hotweights_trainer.integrations.pusher import StepPusher

    cfg = SyncConfig(timeout_s=20, min_receivers=1, receiver_wait_s=0.3, linger_s=0)
    with StepPusher(endpoint, config=cfg, is_main=True) as pusher:
        with pytest.raises(SyncTimeoutError, match="1 receivers connected"):
            pusher.optimizer_stepped(torch.nn.Linear(3, 3))


def test_close_serves_the_final_version_to_a_receiver_that_starts_late(endpoint, caplog):
    tensors = make_tensors(SPEC, 7)
    pub = WeightPublisher(endpoint, config=SyncConfig(bucket_mb=1, timeout_s=20, linger_s=60))
    with caplog.at_level(logging.WARNING, logger="hotweights_trainer.publisher"):
        for i in range(1, 4):  # published to nobody: the receiver is not there yet
            pub.publish(make_tensors(SPEC, i) if i < 3 else tensors, step=i)
    zero = [r for r in caplog.records if "committed to zero receivers" in r.getMessage()]
    assert len(zero) == 1, "one warning per publisher, not per step"
    rx = start_receiver(endpoint, write_spec(SPEC), versions=1)
    try:
        t0 = time.monotonic()
        pub.close()  # returns once the late receiver committed the final version
        assert time.monotonic() - t0 < 50
        assert rx.next()["ready"]
        got = rx.next()
        assert got["version"] == 3 and got["digests"] == weights_digest(tensors)
        assert rx.wait() == 0
    finally:
        rx.kill()


def test_linger_is_bounded_and_zero_turns_it_off(endpoint, caplog):
    pub = WeightPublisher(endpoint, config=SyncConfig(timeout_s=20, linger_s=0.5))
    pub.publish(make_tensors(SPEC, 1))
    with caplog.at_level(logging.WARNING, logger="hotweights_trainer.publisher"):
        t0 = time.monotonic()
        pub.close()
        waited = time.monotonic() - t0
    assert 0.45 < waited < 5
    assert any("after lingering" in r.getMessage() and "reached 0 receiver(s)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ClosedError):
        pub.publish(make_tensors(SPEC, 2))
    pub = WeightPublisher(endpoint, config=SyncConfig(timeout_s=20, linger_s=0))
    pub.publish(make_tensors(SPEC, 1))
    t0 = time.monotonic()
    pub.close()
    assert time.monotonic() - t0 < 0.4


RECEIVER_STARTING_SLOWLY = r"""
import json, sys, time
time.sleep(float(sys.argv[2]))  # still importing torch / loading the model when training starts
from transformers import GPT2Config, GPT2LMHeadModel
from hotweights_trainer import WeightReceiver, SyncConfig
from hotweights_trainer.errors import ClosedError
from hotweights_trainer.verify import weights_digest
import torch
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
with WeightReceiver(sys.argv[1], model=model, config=SyncConfig(timeout_s=60)) as rx:
    v = rx.wait_for_version(1)
    print(json.dumps({"version": v, "step": rx.step, "final": weights_digest(model)}), flush=True)
"""


@pytest.mark.slow
def test_short_trainer_run_at_defaults_reaches_a_receiver_still_starting(endpoint, tmp_path):
    # The issue as reported: both sides started together, callback at its defaults, a run shorter
    # than the receiver's start-up. The final version must still arrive, bit-exact.
    require("hf")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hotweights_trainer import HotweightsCallback

    script = tmp_path / "slow_rx.py"
    script.write_text(RECEIVER_STARTING_SLOWLY)
    rx = Proc([str(script), endpoint, "3"])
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
        data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))}
                for _ in range(8)]
        cb = HotweightsCallback(endpoint)  # defaults: config from the environment
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=2,
                                 per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
        assert [r.receivers for r in cb.results] == [0, 0]  # nobody was there during training
        got = rx.next(timeout=60)
        assert got["version"] == 2 and got["step"] == 2
        assert got["final"] == weights_digest(model)
        assert rx.wait() == 0
    finally:
        rx.kill()


PUBLISH_AND_EXIT = r"""
import json, sys
from hotweights_trainer import SyncConfig, WeightPublisher
from tests.procs.common import load_spec, make_tensors
cfg = SyncConfig(bucket_mb=1, timeout_s=20, coord_backend="redis", redis_url=sys.argv[3], linger_s=60)
with WeightPublisher(sys.argv[1], config=cfg) as pub:
    result = pub.publish(make_tensors(load_spec(sys.argv[2]), 5), step=5)
    print(json.dumps({"published": result.version, "receivers": result.receivers}), flush=True)
print(json.dumps({"closed": True}), flush=True)  # close() returned: it waited for the late receiver
"""


def test_publisher_on_redis_exiting_right_after_publishing_still_delivers(endpoint, tmp_path, redis_server):
    # The Redis control plane as reported: the publisher exits right after its last publish, before
    # the receiver is up. Lingering in close() is what delivers the version, whatever the backend.
    spec_path = write_spec(SPEC)
    script = tmp_path / "pub.py"
    script.write_text(PUBLISH_AND_EXIT)
    pub = Proc([str(script), endpoint, spec_path, redis_server.url])
    rx = None
    try:
        assert pub.next() == {"published": 1, "receivers": 0}
        rx = start_receiver(endpoint, spec_path, versions=1)
        assert rx.next()["ready"]
        got = rx.next()
        assert got["version"] == 1 and got["step"] == 5
        assert got["digests"] == weights_digest(make_tensors(SPEC, 5))
        assert pub.next()["closed"] and pub.wait() == 0
    finally:
        pub.kill()
        if rx is not None:
            rx.kill()
