"""The engine's threading contract: a bug in engine code reaches the caller at once, typed, with its cause.

Faults are injected in-process (a handler method replaced by one that raises) into real publishers and
receivers talking over real sockets, on the thread where that code runs: the publisher's engine
thread, the transport's control thread, a receiver's connection or delivery thread. Every config
here has a 60 s deadline, so an error that was swallowed would surface as a SyncTimeoutError
instead of the EngineError the tests expect.
"""

from __future__ import annotations

import threading

import pytest
import torch

from hotweights_trainer import HotweightsError, SyncConfig, SyncTimeoutError, WeightPublisher, WeightReceiver
from hotweights_trainer.errors import EngineError
from hotweights_trainer.publish_engine import PublisherEngine
from hotweights_trainer.transports.shm import ShmPublisher
from tests.conftest import free_port
from tests.procs.common import make_tensors, mixed_spec
from tests.procs.spawn import start_receiver, write_spec

CFG = SyncConfig(bucket_mb=1, timeout_s=60, linger_s=0)


class Injected(RuntimeError):
    """The fault these tests plant."""


def _raise(*_args, **_kwargs):
    raise Injected("planted fault")


def _cause_chain(err: BaseException) -> list[BaseException]:
    out = []
    while err is not None:
        out.append(err)
        err = err.__cause__
    return out


def test_fault_in_an_engine_handler_fails_the_version_with_its_cause(endpoint, monkeypatch):
    spec = mixed_spec(n_small=3, big_elems=5000)
    rx = start_receiver(endpoint, write_spec(spec), versions=2)
    try:
        assert rx.next()["ready"]
        with WeightPublisher(endpoint, config=CFG) as pub:
            pub.wait_for_receivers(1)
            assert pub.publish(make_tensors(spec, 1)).version == 1
            monkeypatch.setattr(PublisherEngine, "_staged", _raise)  # the engine thread's "staged" handler
            with pytest.raises(EngineError) as info:
                pub.publish(make_tensors(spec, 2))
            assert not isinstance(info.value, SyncTimeoutError)
            assert isinstance(info.value.__cause__, Injected)
            assert "version 2" in str(info.value) and "'staged'" in str(info.value)
            monkeypatch.undo()
            # The engine thread survived: the next version goes through.
            assert pub.publish(make_tensors(spec, 3)).version == 3
    finally:
        rx.kill()


def test_fault_on_the_transport_control_thread_reaches_the_next_publish(endpoint, monkeypatch):
    spec = mixed_spec(n_small=3, big_elems=5000)
    called = threading.Event()

    def housekeep(self):  # runs on the control server's thread every TICK_S
        called.set()
        raise Injected("planted fault")

    monkeypatch.setattr(ShmPublisher, "housekeep", housekeep)
    with WeightPublisher(endpoint, config=CFG) as pub:
        assert called.wait(30)
        with pytest.raises(EngineError) as info:
            for _ in range(5):  # the failure is queued right after the hook raised
                pub.publish(make_tensors(spec, 1))
        assert isinstance(info.value.__cause__, Injected)
        assert "housekeep" in str(info.value)


@pytest.mark.parametrize("transport", ["shm", "torch"])
def test_fault_in_a_receiver_handler_fails_the_version_on_both_sides(endpoint, transport, monkeypatch):
    """shm calls the receiver's handlers on its connection thread, torch on its ordered delivery thread."""
    ep = endpoint if transport == "shm" else f"tcp://127.0.0.1:{free_port()}"
    cfg = SyncConfig(bucket_mb=1, timeout_s=60, linger_s=0, transport=transport)
    source, served = torch.nn.Linear(64, 16), torch.nn.Linear(64, 16)
    before = {k: v.clone() for k, v in served.state_dict().items()}
    monkeypatch.setattr(WeightReceiver, "on_bucket", _raise)
    with WeightPublisher(ep, config=cfg) as pub, WeightReceiver(ep, model=served, config=cfg) as rx:
        pub.wait_for_receivers(1)
        with pytest.raises(HotweightsError) as published:
            pub.publish(source)
        assert not isinstance(published.value, SyncTimeoutError)
        assert "EngineError" in str(published.value)  # the receiver's nack names what failed
        with pytest.raises(EngineError) as received:
            rx.wait_for_version(1, timeout=60)
        assert any(isinstance(e, Injected) for e in _cause_chain(received.value))
        assert rx.version == 0  # nothing was applied
        assert all(torch.equal(v, before[k]) for k, v in served.state_dict().items())


def test_fault_in_a_transport_post_fails_the_version_and_the_next_one_goes_through(endpoint, monkeypatch):
    spec = mixed_spec(n_small=3, big_elems=300_000)  # several buckets: the fault comes mid-version
    rx = start_receiver(endpoint, write_spec(spec), versions=1)
    real_post = ShmPublisher.post
    posted = []

    def post(self, to, version, index, buf):  # runs on the engine thread
        posted.append(index)
        if index == 1:
            raise Injected("planted fault")
        real_post(self, to, version, index, buf)

    try:
        assert rx.next()["ready"]
        with WeightPublisher(endpoint, config=CFG) as pub:
            pub.wait_for_receivers(1)
            monkeypatch.setattr(ShmPublisher, "post", post)
            with pytest.raises(EngineError) as info:
                pub.publish(make_tensors(spec, 1))
            assert isinstance(info.value.__cause__, Injected) and "version 1" in str(info.value)
            monkeypatch.undo()
            assert pub.publish(make_tensors(spec, 2)).receivers == 1  # version 1 was aborted, not applied
            assert rx.next()["version"] == 2
    finally:
        rx.kill()
