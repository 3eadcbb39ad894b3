"""One push path for every framework, settings that cannot take effect, and the exported errors.

The HF Trainer callback and DeepSpeed's ``attach`` are run for real in ``test_hf_callback.py``,
``test_async_publish.py`` and ``test_optim_deepspeed.py``; Accelerate runs here, in process.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

import hotweights_trainer
from hotweights_trainer import ConfigError, SyncConfig, WeightPublisher, WeightReceiver, errors
from hotweights_trainer.delta import engine as delta_engine
from hotweights_trainer.integrations.pusher import StepPusher
from hotweights_trainer.transports import publisher_class
from hotweights_trainer.verify import weights_digest
from tests.conftest import require


def test_every_error_class_is_exported_from_the_package_root():
    classes = {name: obj for name, obj in vars(errors).items() if inspect.isclass(obj)
               and issubclass(obj, BaseException) and obj.__module__ == errors.__name__}
    assert {"ClosedError", "AuthError", "ShardingMismatchError"} <= set(classes)
    missing = sorted(set(classes) - set(hotweights_trainer.__all__))
    assert missing == [], f"errors users can receive but not import from the package root: {missing}"
    assert all(getattr(hotweights_trainer, name) is cls for name, cls in classes.items())


def test_accelerate_loop_honours_async_publish(endpoint):
    """Snapshots at every second real optimizer step (accumulation 2), sent in the background, each
    version bit-exact with the weights of the boundary it claims."""
    require("hf")
    from accelerate import Accelerator

    from hotweights_trainer.integrations.accelerate import AccelerateSync

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    replica = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    cfg = SyncConfig(timeout_s=30, async_publish=True, linger_s=0)
    boundary: dict[int, str] = {}
    with AccelerateSync(accelerator, endpoint, every_n_steps=2, config=cfg) as sync, \
            WeightReceiver(endpoint, model=replica, config=cfg) as rx:
        assert sync.is_main and sync.async_publisher is not None
        sync.wait_for_receivers(1)
        for _ in range(8):  # 8 micro-batches: 4 optimizer steps, pushes after steps 2 and 4
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.randn(4, 8)).pow(2).mean())
                opt.step()
                assert sync.after_step(model) is None  # asynchronous: the result comes later
                opt.zero_grad()
            if accelerator.sync_gradients and sync.optimizer_steps % 2 == 0:
                boundary[sync.optimizer_steps] = weights_digest(accelerator.unwrap_model(model))
                rx.wait_for_version(sync.optimizer_steps // 2, timeout=30)
                assert rx.step == sync.optimizer_steps
                assert weights_digest(replica) == boundary[rx.step]
        assert sync.push_final(model) is None  # step 4 is already out
        assert sync.async_pushes == 2 and sync.errors == []
        assert [(r.version, r.step) for r in sync.results] == [(1, 2), (2, 4)]


def test_vllm_in_adapter_mode_without_the_model_is_refused(endpoint):
    cfg = SyncConfig(peft_mode="adapter", timeout_s=5, linger_s=0)
    with pytest.raises(ConfigError, match=r"vllm= with peft_mode='adapter' needs the model"):
        StepPusher(endpoint, config=cfg, vllm="http://127.0.0.1:9", is_main=True)
    WeightPublisher(endpoint, config=cfg).close()  # refused before anything was bound


def test_adapter_mode_on_a_model_without_adapters_is_said_once(endpoint, caplog):
    cfg = SyncConfig(peft_mode="adapter", timeout_s=10, linger_s=0)
    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="hotweights_trainer.integrations.pusher"), \
            StepPusher(endpoint, config=cfg, is_main=True) as pusher:
        for _ in range(3):
            pusher.optimizer_stepped(model)
    said = [r for r in caplog.records if "peft_mode='adapter' has no effect" in r.getMessage()]
    assert len(said) == 1 and [r.step for r in pusher.results] == [1, 2, 3]


class GpuOnlyTransport:
    """Stands in for the CUDA-IPC publisher transport, which needs a GPU: its capabilities, and close()."""

    name = "cuda_ipc"
    closed = False

    def __init__(self) -> None:
        cls = publisher_class("cuda_ipc")
        self.supports_delta, self.addressable = cls.supports_delta, cls.addressable

    def close(self) -> None:
        self.closed = True


def test_delta_that_the_transport_cannot_carry_is_refused_or_warned_once(caplog):
    assert "device memory" in delta_engine.delta_unavailable(publisher_class("cuda_ipc"))
    assert delta_engine.delta_unavailable(publisher_class("shm")) is None
    make = delta_engine.make_publisher_delta

    tx = GpuOnlyTransport()
    with pytest.raises(ConfigError, match=r"delta='always' cannot take effect on cuda_ipc \(chosen by "
                                          r"transport auto-selection\)"):
        make(SyncConfig(delta="always"), tx, session=1, endpoint_label="shm://x")
    assert tx.closed  # the publisher being built never owns it, so it is closed here

    delta_engine._warned_dense.discard("cuda_ipc")
    with caplog.at_level(logging.WARNING, logger=delta_engine.__name__):
        assert make(SyncConfig(), GpuOnlyTransport(), session=1, endpoint_label="shm://x") is None
        assert make(SyncConfig(), GpuOnlyTransport(), session=2, endpoint_label="shm://y") is None
        assert make(SyncConfig(delta="off"), GpuOnlyTransport(), session=3, endpoint_label="shm://z") is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "delta sync is off on cuda_ipc (chosen by transport auto-selection)" in said[0]
    assert "transport='shm'" in said[0]
