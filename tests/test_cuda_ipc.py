"""The cuda_ipc transport's protocol, end to end with real processes, on machines without a GPU.

Only the device memory is swapped (tests/procs/host_ipc.py: shared host files instead of CUDA IPC
handles); the transport code, exports per receiver, acks, the in-flight window, handle TTLs, digests,
staged copies, the engine's two-phase commit and the device-bucket apply path all run as on a GPU.
tests/test_cuda_ipc_gpu.py runs the same transport on real CUDA memory where a device exists.
"""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from hotweights_trainer import (CorruptBucketError, SyncConfig, WeightPublisher, WeightReceiver,
                                WireFormatError, metrics)
from hotweights_trainer.errors import AuthError
from hotweights_trainer.transports import cuda_ipc
from hotweights_trainer.verify import weights_digest
from tests.procs import host_ipc
from tests.procs.common import SpecModule, make_tensors, mixed_spec
from tests.procs.spawn import Proc, write_spec

TIMEOUT = 20.0
SPEC = mixed_spec(n_small=12, big_elems=400_000)  # ~5.6 MB: several 1 MiB buckets, tensors split across them
SMALL = mixed_spec(n_small=4, big_elems=300_000)  # 3 MiB: a handful of buckets


@pytest.fixture
def memory(tmp_path, monkeypatch):
    """This process's cuda_ipc transports allocate and open 'device' memory in shared host files."""
    mem = host_ipc.HostIpcMemory(str(tmp_path))
    monkeypatch.setattr(cuda_ipc, "memory_factory", lambda: mem)
    return mem


def _endpoint() -> str:
    return f"shm://ipc-{uuid.uuid4().hex[:10]}"


def _config(**over) -> SyncConfig:
    base = dict(transport="cuda_ipc", bucket_mb=1, timeout_s=TIMEOUT, ipc_copy_chunk_mb=1)
    base.update(over)
    return SyncConfig(**base)


def _receiver_proc(directory: str, endpoint: str, spec_path: str, *, until: int, die_at: str | None = None) -> Proc:
    args = ["-m", "tests.procs.ipc_receiver", directory, "--endpoint", endpoint, "--transport", "cuda_ipc",
            "--spec", spec_path, "--until", str(until), "--timeout", str(TIMEOUT)]
    if die_at:
        args += ["--die-at", die_at]
    return Proc(args)


def _line_for(proc: Proc, version: int) -> dict:
    while True:
        line = proc.next(timeout=TIMEOUT + 10)
        if line.get("version") == version and "digests" in line:
            return line


def test_round_trip_to_receiver_processes_bit_exact(memory, tmp_path):
    endpoint, spec_path = _endpoint(), write_spec(SPEC)
    rx = _receiver_proc(str(tmp_path), endpoint, spec_path, until=3)
    try:
        assert rx.next(TIMEOUT)["ready"]
        cfg = _config(ipc_inflight_buckets=2)
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(1)
            for v in (1, 2, 3):
                tensors = make_tensors(SPEC, 10 + v)
                res = pub.publish(tensors)
                assert _line_for(rx, v)["digests"] == weights_digest(tensors)
            stats = pub.transport.stats()
            created = pub.transport._pool.created
        assert rx.wait(TIMEOUT) == 0
    finally:
        rx.kill()
    assert res.buckets >= 4 and res.delta is None  # device buckets go dense
    assert stats.buckets_posted == 3 * res.buckets and stats.inflight_buckets == 0 and stats.inflight_bytes == 0
    assert 1 <= stats.inflight_buckets_high <= 2
    # Two versions' buffers exist at most (committed + open); each exported once per receiver, and
    # version 3 reuses version 1's buffers and their exports.
    assert created <= 2 * res.buckets
    assert memory.exports == created
    snap = metrics.snapshot()
    labels = f'endpoint="{endpoint}",transport="cuda_ipc"'
    assert snap[f"hotweights_ipc_window{{{labels}}}"] == 2
    for name in ("hotweights_ipc_recommended_window", "hotweights_ipc_inflight_buckets",
                 "hotweights_ipc_inflight_bytes", "hotweights_ipc_congestion_risk"):
        assert f"{name}{{{labels}}}" in snap, name
    assert snap[f"hotweights_transport_buckets_total{{{labels}}}"] >= 3 * res.buckets


def test_late_joiner_catches_up_and_a_killed_receiver_is_released(memory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hotweights_trainer.transports.cuda_ipc")
    endpoint, spec_path = _endpoint(), write_spec(SPEC)
    dying = _receiver_proc(str(tmp_path), endpoint, spec_path, until=2, die_at="2:1")
    late = None
    try:
        assert dying.next(TIMEOUT)["ready"]
        with WeightPublisher(endpoint, config=_config()) as pub:
            pub.wait_for_receivers(1)
            v1 = make_tensors(SPEC, 1)
            pub.publish(v1)
            assert _line_for(dying, 1)["digests"] == weights_digest(v1)
            late = _receiver_proc(str(tmp_path), endpoint, spec_path, until=2)
            assert late.next(TIMEOUT)["ready"]
            assert _line_for(late, 1)["digests"] == weights_digest(v1)  # caught up from the committed buffers
            pub.wait_for_receivers(2)
            v2 = make_tensors(SPEC, 2)
            try:
                pub.publish(v2)  # the first receiver dies at bucket 1: it leaves the quorum
            except Exception:  # noqa: BLE001 - depending on timing the version aborts; publish again
                pub.publish(v2)
            assert _line_for(late, 2)["digests"] == weights_digest(v2)
            assert dying.wait(TIMEOUT) != 0
            deadline = time.monotonic() + TIMEOUT
            while not memory.released and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = pub.transport.stats()
        # The dead process's IPC references were released by the publisher (nothing leaks).
        assert memory.released and all(e["kind"] == "host" for e in memory.released)
        assert any("died" in r.getMessage() for r in caplog.records)
        assert stats.inflight_buckets == 0
    finally:
        dying.kill()
        if late is not None:
            late.kill()


def test_window_and_byte_cap_bound_what_is_in_flight(memory):
    endpoint = _endpoint()
    cap = 3 << 20
    cfg = _config(ipc_inflight_buckets=2, ipc_inflight_bytes=cap)
    spec = mixed_spec(n_small=4, big_elems=1_500_000)  # ~13 buckets of 1 MiB
    model = SpecModule(spec)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        for v in (1, 2):
            tensors = make_tensors(spec, 50 + v)
            res = pub.publish(tensors)
            rx.wait_for_version(v)
            assert weights_digest(model) == weights_digest(tensors)
        stats = pub.transport.stats()
    assert res.buckets >= 10
    assert 1 <= stats.inflight_buckets_high <= 2 and 0 < stats.inflight_bytes_high <= cap
    assert stats.buckets_posted == 2 * res.buckets


def test_unacked_handles_expire_after_their_ttl_and_free_the_window(memory, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="hotweights_trainer.transports.cuda_ipc")
    monkeypatch.setattr(cuda_ipc.CudaIpcReceiver, "_ack", lambda self, key, ok: None)  # a receiver that never acks
    endpoint = _endpoint()
    cfg = _config(ipc_inflight_buckets=1, handle_ttl=0.3)
    model = SpecModule(SMALL)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        tensors = make_tensors(SMALL, 5)
        t0 = time.monotonic()
        res = pub.publish(tensors)  # every bucket after the first waits for its predecessor's TTL
        took = time.monotonic() - t0
        rx.wait_for_version(1)
        assert weights_digest(model) == weights_digest(tensors)
        stats = pub.transport.stats()
    assert res.buckets >= 3
    assert took >= 0.3 * (res.buckets - 1) * 0.9
    assert stats.extra["handles_expired"] >= res.buckets - 1
    assert any("expired" in r.getMessage() for r in caplog.records)


def test_corrupted_bucket_rejects_the_version_whole(memory, monkeypatch):
    endpoint = _endpoint()
    cfg = _config()
    model = SpecModule(SMALL)
    pack = cuda_ipc.CudaIpcPublisher.pack

    def corrupt_bucket_1(self, buf, plan, *, version, index, session, flags=0):
        n = pack(self, buf, plan, version=version, index=index, session=session, flags=flags)
        if version == 2 and index == 1:
            buf.owner.tensor[100] ^= 0x5A  # after the digest: what a torn or reused buffer looks like
        return n

    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        good = make_tensors(SMALL, 1)
        pub.publish(good)
        rx.wait_for_version(1)
        monkeypatch.setattr(cuda_ipc.CudaIpcPublisher, "pack", corrupt_bucket_1)
        with pytest.raises(CorruptBucketError, match="digest"):
            pub.publish(make_tensors(SMALL, 2))
        with pytest.raises(CorruptBucketError):
            rx.poll()  # the receiver reports it once
        assert rx.version == 1 and weights_digest(model) == weights_digest(good)  # nothing applied
        monkeypatch.setattr(cuda_ipc.CudaIpcPublisher, "pack", pack)
        v3 = make_tensors(SMALL, 3)
        pub.publish(v3)
        rx.wait_for_version(3)
        assert weights_digest(model) == weights_digest(v3)


def test_transport_mismatch_is_named_on_both_sides(memory):
    endpoint = _endpoint()
    with WeightPublisher(endpoint, config=_config()) as pub:
        with WeightReceiver(endpoint, model=SpecModule(SMALL), config=_config(transport="shm")) as rx:
            with pytest.raises(AuthError, match="transport mismatch.*cuda_ipc"):
                rx.wait_for_version(1, timeout=TIMEOUT)
        assert pub.receivers == []
    endpoint = _endpoint()
    with WeightPublisher(endpoint, config=_config(transport="shm")) as pub, \
            WeightReceiver(endpoint, model=SpecModule(SMALL), config=_config()):
        pub.wait_for_receivers(1)
        with pytest.raises(WireFormatError, match="uses cuda_ipc"):
            pub.publish(make_tensors(SMALL, 1))


def test_handle_signatures_are_checked(memory):
    endpoint = _endpoint()
    with WeightPublisher(endpoint, config=_config(handle_token="right")) as pub, \
            WeightReceiver(endpoint, model=SpecModule(SMALL), config=_config(handle_token="wrong")):
        pub.wait_for_receivers(1)
        with pytest.raises(WireFormatError, match="HMAC"):
            pub.publish(make_tensors(SMALL, 1))
    assert memory.opened == 0  # a handle that failed its signature is never opened


def test_apply_callable_gets_device_bucket_tensors(memory):
    endpoint = _endpoint()
    got: dict = {}
    with WeightPublisher(endpoint, config=_config()) as pub, \
            WeightReceiver(endpoint, apply=lambda items: got.update((n, t.clone()) for n, t in items),
                           config=_config()) as rx:
        pub.wait_for_receivers(1)
        tensors = make_tensors(SPEC, 9)
        pub.publish(tensors)
        rx.wait_for_version(1)
    assert weights_digest(got) == weights_digest(tensors)


def test_capabilities_say_why():
    caps = cuda_ipc.CudaIpcPublisher
    assert caps.pipelined and caps.late_join and not caps.cross_host and not caps.zero_copy
    assert not caps.supports_delta and "delta" in caps.limits and "cross_host" in caps.limits


def test_a_receiver_that_closes_releases_its_own_references(memory, tmp_path):
    endpoint, spec_path = _endpoint(), write_spec(SMALL)
    rx = _receiver_proc(str(tmp_path), endpoint, spec_path, until=1)
    try:
        assert rx.next(TIMEOUT)["ready"]
        with WeightPublisher(endpoint, config=_config()) as pub:
            pub.wait_for_receivers(1)
            pub.publish(make_tensors(SMALL, 1))
            assert _line_for(rx, 1)
            assert rx.wait(TIMEOUT) == 0  # it closed (goodbye sent) and exited
            deadline = time.monotonic() + cuda_ipc.ORPHAN_GRACE_S + 2
            while pub.receivers and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # a few sweeps
            assert pub.transport._orphans == []
        assert memory.released == []  # never released twice: the receiver did it
    finally:
        rx.kill()


def test_slow_receivers_raise_the_congestion_risk_and_it_decays(memory, monkeypatch):
    """Buckets slower than the target with a full window: the measured risk rises, then decays when idle."""
    endpoint = _endpoint()
    cfg = _config(ipc_inflight_buckets=1, ipc_target_bucket_ms=5.0)
    pull = cuda_ipc.CudaIpcReceiver._copy_in

    def slow_copy(self, msg, version):
        time.sleep(0.03)  # a receiver taking ~6x the target per bucket
        return pull(self, msg, version)

    monkeypatch.setattr(cuda_ipc.CudaIpcReceiver, "_copy_in", slow_copy)
    model = SpecModule(SMALL)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        pub.publish(make_tensors(SMALL, 1))
        rx.wait_for_version(1)
        meter = pub.transport._meter
        meter.refresh()
        high = pub.transport.stats().extra["congestion_risk"]
        assert high > 0.5
        snap = metrics.snapshot()
        assert snap[f'hotweights_ipc_congestion_risk{{endpoint="{endpoint}",transport="cuda_ipc"}}'] == \
            pytest.approx(high, abs=0.2)
        later = meter.risk.value(time.monotonic() + 4.0)  # two half-lives of nothing in flight
        assert later == pytest.approx(high * 0.25, rel=0.3)


def test_expired_engine_handles_free_buffers_for_good_and_receivers_unmap_them(memory, monkeypatch, caplog):
    """A receiver that never releases its versions: their handles expire, the buffers are freed (not
    reused) and the receiver is told to drop its mappings."""
    caplog.set_level(logging.INFO, logger="hotweights_trainer.transports.cuda_ipc")
    send = cuda_ipc.CudaIpcReceiver.send

    def never_release(self, msg):
        if msg.get("op") == "release":
            self._staged.release(msg["version"])
            return  # the publisher never hears it
        send(self, msg)

    monkeypatch.setattr(cuda_ipc.CudaIpcReceiver, "send", never_release)
    endpoint = _endpoint()
    cfg = _config(handle_ttl=0.5)
    model = SpecModule(SMALL)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        for v in (1, 2, 3):
            tensors = make_tensors(SMALL, v)
            pub.publish(tensors)
            rx.wait_for_version(v)
        first = {b.id for b in pub.transport._pool.all.values()}
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not any("freed expired" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        freed = first - {b.id for b in pub.transport._pool.all.values()}
        assert freed  # versions 1 and 2 were never released: their buffers expired and went away
        opened = set(rx._tx._opened)
        deadline = time.monotonic() + TIMEOUT
        while opened & freed and time.monotonic() < deadline:
            time.sleep(0.05)
            opened = set(rx._tx._opened)
        assert not opened & freed  # the receiver dropped its mappings of them
        pub.publish(make_tensors(SMALL, 4))  # still works, on fresh buffers
        rx.wait_for_version(4)
        assert weights_digest(model) == weights_digest(make_tensors(SMALL, 4))
    assert memory.released == []  # a live receiver releases its own references
