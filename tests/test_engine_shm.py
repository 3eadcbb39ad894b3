"""The core engine over shm://, with real receiver processes."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from hotweights_trainer import (CorruptBucketError, ManifestMismatchError, PeerLostError, SyncConfig,
                                SyncTimeoutError, WeightPublisher, WeightReceiver)
from hotweights_trainer.verify import weights_digest
from tests.procs.common import SpecModule, make_tensors, mixed_spec
from tests.procs import pause
from tests.procs.spawn import Proc, start_receiver, write_spec

# Closing must not linger here (several tests close publishers whose receivers are gone or never came);
# lingering has its own tests in test_run_edges.py.
CFG = SyncConfig(bucket_mb=1, timeout_s=20, linger_s=0)


@pytest.mark.parametrize("mode", ["model", "apply"])
def test_bit_exact_round_trip_mixed_dtypes(endpoint, mode):
    spec = mixed_spec()
    rx = start_receiver(endpoint, write_spec(spec), versions=2, mode=mode)
    try:
        assert rx.next()["ready"]
        with WeightPublisher(endpoint, config=CFG) as pub:
            pub.wait_for_receivers(1)
            for seed, version in ((1, 1), (2, 2)):
                tensors = make_tensors(spec, seed)
                res = pub.publish(tensors, step=seed * 10)
                assert res.version == version and res.receivers == 1
                assert res.tensors_sent == len(spec) and res.buckets > 3
                got = rx.next()
                assert got["version"] == version and got["step"] == seed * 10
                assert got["digests"] == weights_digest(tensors)
        assert rx.wait() == 0
    finally:
        rx.kill()


def test_two_receivers_and_a_late_joiner(endpoint):
    spec = mixed_spec(n_small=10, big_elems=300_000)
    path = write_spec(spec)
    a, b = start_receiver(endpoint, path, versions=2), start_receiver(endpoint, path, versions=2)
    late = None
    try:
        with WeightPublisher(endpoint, config=CFG) as pub:
            a.next(), b.next()
            pub.wait_for_receivers(2)
            v1 = make_tensors(spec, 1)
            assert pub.publish(v1).receivers == 2
            for r in (a, b):
                assert r.next()["digests"] == weights_digest(v1)
            v2 = make_tensors(spec, 2)
            pub.publish(v2)
            for r in (a, b):
                assert r.next()["digests"] == weights_digest(v2)
            # A receiver that starts now gets the current version in full, without a new publish.
            late = start_receiver(endpoint, path, versions=1)
            got = late.next(), late.next()
            assert got[1]["version"] == 2 and got[1]["digests"] == weights_digest(v2)
    finally:
        for r in (a, b, late):
            if r is not None:
                r.kill()


def test_receiver_started_before_publisher(endpoint):
    spec = mixed_spec(n_small=3, big_elems=1000)
    rx = start_receiver(endpoint, write_spec(spec), versions=1)
    try:
        rx.next()
        time.sleep(0.5)  # it is now retrying to connect
        with WeightPublisher(endpoint, config=CFG) as pub:
            pub.wait_for_receivers(1)
            t = make_tensors(spec, 5)
            pub.publish(t)
            assert rx.next()["digests"] == weights_digest(t)
    finally:
        rx.kill()


SLOW_PUBLISHER = r"""
import sys, time, json
from hotweights_trainer import SyncConfig, WeightPublisher
from tests.procs.common import make_tensors, load_spec
spec = load_spec(sys.argv[1]); endpoint = sys.argv[2]
pub = WeightPublisher(endpoint, config=SyncConfig(bucket_mb=1, timeout_s=20))
pub.wait_for_receivers(1)
pub.publish(make_tensors(spec, 1))
print(json.dumps({"published": 1}), flush=True)
def slow():
    for i, (name, t) in enumerate(make_tensors(spec, 2).items()):
        if i == len(spec) // 2:
            print(json.dumps({"halfway": True}), flush=True)
            time.sleep(60)
        yield name, t
pub.publish(slow())
"""


def test_publisher_killed_mid_version_leaves_receiver_on_previous(endpoint, tmp_path):
    spec = mixed_spec(n_small=30, big_elems=400_000)
    spec_path = write_spec(spec)
    script = tmp_path / "slow_pub.py"
    script.write_text(SLOW_PUBLISHER)
    model = SpecModule(spec)
    with WeightReceiver(endpoint, model=model, config=SyncConfig(timeout_s=3)) as rx:
        pub = Proc([str(script), spec_path, endpoint])
        try:
            assert pub.next()["published"] == 1
            assert rx.wait_for_version(1) == 1
            v1 = weights_digest(make_tensors(spec, 1))
            assert weights_digest(model) == v1
            assert pub.next()["halfway"]
            time.sleep(0.3)  # buckets of version 2 have been posted and staged by now
            os.kill(pub.p.pid, signal.SIGKILL)
            pub.wait(10)
            with pytest.raises(PeerLostError):
                rx.wait_for_version(2, timeout=2)
            assert rx.poll() is None
            assert rx.version == 1
            assert weights_digest(model) == v1
        finally:
            pub.kill()
    # The dead publisher's shared memory is gone once anyone noticed its death.
    name = endpoint.split("://")[1]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"hwt.{name}.")]


def test_corrupted_bucket_is_rejected(endpoint):
    spec = mixed_spec(n_small=5, big_elems=1000)
    name = endpoint.split("://")[1]
    with WeightPublisher(endpoint, config=CFG) as pub:
        good = make_tensors(spec, 1)
        pub.publish(good)
        blocks = [f for f in os.listdir("/dev/shm") if f.startswith(f"hwt.{name}.")]
        assert blocks
        with open(f"/dev/shm/{blocks[0]}", "r+b") as f:
            f.seek(4096 if os.path.getsize(f"/dev/shm/{blocks[0]}") > 8192 else 200)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
        model = SpecModule(spec)
        before = weights_digest(model)
        with WeightReceiver(endpoint, model=model, config=SyncConfig(timeout_s=5)) as rx:
            with pytest.raises(CorruptBucketError, match="checksum"):
                rx.wait_for_version(1, timeout=5)
            assert rx.version == 0
            assert weights_digest(model) == before


def test_manifest_mismatch_names_every_tensor_and_applies_nothing(endpoint):
    spec = [["a.w", "float32", [4, 4]], ["b.w", "float32", [3]], ["c.w", "float16", [2]], ["d.w", "float32", [5]]]
    receiver_spec = [["a.w", "float32", [4, 4]], ["b.w", "float32", [4]], ["c.w", "float32", [2]],
                     ["d.w", "float32", [5]]]
    model = SpecModule(receiver_spec)
    sent = make_tensors(spec, 1)
    sent["zzz.unknown"] = torch.ones(2)
    before = weights_digest(model)
    with WeightPublisher(endpoint, config=CFG) as pub, \
            WeightReceiver(endpoint, model=model, config=CFG) as rx:
        pub.wait_for_receivers(1)
        with pytest.raises(ManifestMismatchError) as info:
            pub.publish(sent)
        assert set(info.value.problems) == {"b.w", "c.w", "zzz.unknown"}
        msg = str(info.value)
        assert "shape mismatch" in msg and "dtype mismatch" in msg and "unknown name" in msg
        with pytest.raises(ManifestMismatchError):
            rx.wait_for_version(1, timeout=2)
        assert rx.version == 0 and weights_digest(model) == before
        # The next good version goes through.
        del sent["zzz.unknown"]
        good = make_tensors(receiver_spec, 3)
        assert pub.publish(good).version == 2
        assert rx.wait_for_version(2) == 2 and weights_digest(model) == weights_digest(good)


def test_receiver_without_publisher_times_out(endpoint):
    with WeightReceiver(endpoint, model=torch.nn.Linear(2, 2), config=SyncConfig(timeout_s=1)) as rx:
        t0 = time.monotonic()
        with pytest.raises(SyncTimeoutError, match="never connected"):
            rx.wait_for_version(1)
        assert time.monotonic() - t0 < 5


def test_stalled_receiver_gives_publisher_a_bounded_timeout(endpoint):
    spec = mixed_spec(n_small=3, big_elems=1000)
    rx = start_receiver(endpoint, write_spec(spec), versions=3)
    try:
        with WeightPublisher(endpoint, config=SyncConfig(bucket_mb=1, timeout_s=4, linger_s=0)) as pub:
            rx.next()
            pub.wait_for_receivers(1)
            pub.publish(make_tensors(spec, 1))
            pause.stop(rx.p.pid)
            t0 = time.monotonic()
            # Bounded either way: the deadline passes (SyncTimeoutError) or the frozen receiver's
            # heartbeats lapse first and it is evicted from the quorum (the version commits without it).
            try:
                res = pub.publish(make_tensors(spec, 2))
            except SyncTimeoutError as exc:
                assert "did not stage" in str(exc)
            else:
                assert res.receivers == 0
            assert time.monotonic() - t0 < 12
            # The stalled receiver was disconnected; the next version does not wait for it.
            assert pub.publish(make_tensors(spec, 3)).receivers == 0
    finally:
        os.kill(rx.p.pid, signal.SIGCONT)
        rx.kill()


def test_bad_source_and_bad_endpoint_raise_typed_errors(endpoint):
    from hotweights_trainer import EndpointError, HotweightsError

    with pytest.raises(EndpointError):
        WeightPublisher("nfs://x", config=CFG)
    with pytest.raises(EndpointError):
        WeightPublisher("shm://bad/name", config=CFG)
    with WeightPublisher(endpoint, config=CFG) as pub:
        with pytest.raises(HotweightsError, match="expected"):
            pub.publish([("a", 3)])
        with pytest.raises(HotweightsError, match="twice"):
            pub.publish([("a", torch.ones(1)), ("a", torch.ones(1))])
        with pytest.raises(EndpointError, match="already serves"):
            WeightPublisher(endpoint, config=CFG)
        assert pub.publish({"a": torch.ones(1)}).version == 3  # failed versions burn their numbers


def test_send_dtype_casts_on_the_trainer(endpoint):
    src = {"w": torch.randn(1000), "ids": torch.arange(5)}
    model = SpecModule([["w", "bfloat16", [1000]], ["ids", "int64", [5]]])
    cfg = SyncConfig(bucket_mb=1, timeout_s=10, send_dtype="bfloat16")
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        res = pub.publish(src)
        assert res.bytes_sent < 1000 * 4
        rx.wait_for_version(1)
        assert torch.equal(model.w.data, src["w"].to(torch.bfloat16))
        assert torch.equal(model.ids, src["ids"])


def test_wrapper_prefixes_and_name_map(endpoint):
    inner = torch.nn.Linear(3, 2)
    src = {"module._orig_mod.weight": inner.weight.detach() + 1, "module._orig_mod.bias": inner.bias.detach()}
    target = torch.nn.Linear(3, 2)
    renamed = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with WeightPublisher(endpoint, config=CFG) as pub, \
            WeightReceiver(endpoint, model=target, config=CFG) as rx, \
            WeightReceiver(endpoint, model=renamed, config=CFG, name_map=lambda n: "0." + n) as rx2:
        pub.wait_for_receivers(2)
        pub.publish(src)
        rx.wait_for_version(1), rx2.wait_for_version(1)
        assert torch.equal(target.weight, inner.weight + 1)
        assert torch.equal(renamed[0].weight, inner.weight + 1)


def test_model_references_stay_valid(endpoint):
    model = torch.nn.Linear(4, 4)
    held = model.weight
    ptr = held.data_ptr()
    src = torch.nn.Linear(4, 4)
    with WeightPublisher(endpoint, config=CFG) as pub, WeightReceiver(endpoint, model=model, config=CFG) as rx:
        pub.wait_for_receivers(1)
        pub.publish(src)
        rx.wait_for_version(1)
    assert model.weight is held and held.data_ptr() == ptr and torch.equal(held, src.weight)


def test_receiver_killed_mid_version_does_not_block_the_others(endpoint):
    spec = mixed_spec(n_small=20, big_elems=200_000)
    path = write_spec(spec)
    doomed, survivor = start_receiver(endpoint, path, versions=3), start_receiver(endpoint, path, versions=3)
    try:
        with WeightPublisher(endpoint, config=SyncConfig(bucket_mb=1, timeout_s=20)) as pub:
            doomed.next(), survivor.next()
            pub.wait_for_receivers(2)
            pub.publish(make_tensors(spec, 1))
            survivor.next(), doomed.next()

            def slow():
                for i, item in enumerate(make_tensors(spec, 2).items()):
                    if i == len(spec) // 2:
                        os.kill(doomed.p.pid, signal.SIGKILL)
                        time.sleep(0.5)
                    yield item

            t0 = time.monotonic()
            res = pub.publish(slow())
            assert time.monotonic() - t0 < 10
            assert res.receivers == 1
            assert survivor.next()["digests"] == weights_digest(make_tensors(spec, 2))
    finally:
        doomed.kill()
        survivor.kill()


def test_late_joiner_during_catch_up_follows_next_version(endpoint):
    """A receiver whose catch-up is overtaken by a new version is not evicted for the old one."""
    spec = mixed_spec(n_small=5, big_elems=100_000)
    cfg = SyncConfig(bucket_mb=1, timeout_s=3)
    with WeightPublisher(endpoint, config=cfg) as pub:
        pub.publish(make_tensors(spec, 1))
        with WeightReceiver(endpoint, model=SpecModule(spec), config=cfg) as rx:
            pub.wait_for_receivers(1)
            pub.publish(make_tensors(spec, 2))
            assert rx.wait_for_version(2) == 2
            time.sleep(cfg.timeout_s + 1)  # past any catch-up deadline
            assert pub.receivers == [rx.receiver_id]
            pub.publish(make_tensors(spec, 3))
            assert rx.wait_for_version(3) == 3
