"""One conformance suite for every transport this machine offers, with real processes.

Each case runs against every available transport: shm (always), torch (real gloo groups), ucx
(ucxx over TCP on loopback; also through the asyncio binding ucx-py shares), and mpi under a real
``mpirun`` (tests/test_transport_mpi.py, same cases). A case a transport cannot support by design is
reported from the transport's own capability attributes and ``limits``, never silently skipped.
"""

from __future__ import annotations

import time
import uuid

import pytest

from hotweights_trainer import (CorruptBucketError, EndpointError, HotweightsError, PeerLostError, SyncConfig,
                                SyncTimeoutError, WeightPublisher, WeightReceiver)
from hotweights_trainer.control.status_socket import query_status
from hotweights_trainer.transports import publisher_class
from hotweights_trainer.verify import weights_digest
from tests.conftest import child_env, free_port, require
from tests.procs.common import SpecModule, make_tensors, mixed_spec
from tests.procs.spawn import Proc, write_spec

TIMEOUT = 20.0
SPEC = mixed_spec(n_small=12, big_elems=400_000)  # ~5.6 MB: several 1 MiB buckets, tensors split across them

VARIANTS = {
    "shm": ("shm", "auto", None),
    "torch": ("torch", "auto", None),
    "ucx": ("ucx", "ucxx", "ucx"),
    "ucx-async": ("ucx", "ucxx-async", "ucx"),
}


@pytest.fixture(params=["shm", "torch", "ucx"])
def variant(request):
    transport, binding, needs = VARIANTS[request.param]
    if needs:
        require(needs)
    return request.param


def _transport(variant: str) -> str:
    return VARIANTS[variant][0]


def _endpoint(variant: str) -> str:
    """Where the publisher listens; receivers take ``pub.endpoint`` (for tcp://, the port it bound)."""
    if _transport(variant) == "shm":
        return f"shm://c-{uuid.uuid4().hex[:10]}"
    return "tcp://127.0.0.1:0"


def _config(variant: str, **over) -> SyncConfig:
    transport, binding, _ = VARIANTS[variant]
    base = dict(transport=transport, bucket_mb=1, timeout_s=TIMEOUT, bcast_prefetch=True, bcast_chunk_mb=1,
                ucx_chunk_mb=1, ucx_backend=binding)
    base.update(over)
    return SyncConfig(**base)


def _receiver(variant: str, endpoint, spec_path: str, *, until: int, die_at: str | None = None) -> Proc:
    transport, binding, _ = VARIANTS[variant]
    args = ["-m", "tests.procs.tx_receiver", "--endpoint", str(endpoint), "--transport", transport,
            "--ucx-backend", binding, "--spec", spec_path, "--until", str(until), "--timeout", str(TIMEOUT)]
    if die_at:
        args += ["--die-at", die_at]
    return Proc(args)


def _next_version(proc: Proc, version: int) -> dict:
    """The receiver's line for ``version`` (skipping errors it reported for rejected versions)."""
    while True:
        line = proc.next(timeout=TIMEOUT + 10)
        if line.get("version") == version and "digests" in line:
            return line
        assert "digests" not in line or line["version"] < version, line


def _kill_all(*procs):
    for p in procs:
        if p is not None:
            p.kill()


def test_bit_exact_round_trip(variant):
    spec_path, rx = write_spec(SPEC), None
    try:
        with WeightPublisher(_endpoint(variant), config=_config(variant)) as pub:
            rx = _receiver(variant, pub.endpoint, spec_path, until=2)
            assert rx.next(TIMEOUT)["ready"]
            assert pub.transport.name == _transport(variant)
            pub.wait_for_receivers(1)
            for v in (1, 2):
                tensors = make_tensors(SPEC, v)
                res = pub.publish(tensors, step=v)
                assert res.version == v and res.receivers == 1 and res.buckets >= 3
                assert _next_version(rx, v)["digests"] == weights_digest(tensors)
            stats = pub.transport.stats()
            assert stats.bytes_posted >= 2 * res.bytes_sent and stats.buckets_posted >= 2 * res.buckets
        assert rx.wait(TIMEOUT) == 0
    finally:
        _kill_all(rx)


def test_several_receivers(variant):
    spec_path, rxs = write_spec(SPEC), []
    local = SpecModule(SPEC)  # a third receiver, in this process
    cfg = _config(variant)
    try:
        with WeightPublisher(_endpoint(variant), config=cfg) as pub, \
                WeightReceiver(pub.endpoint, model=local, config=cfg) as rx:
            rxs = [_receiver(variant, pub.endpoint, spec_path, until=2) for _ in range(2)]
            for r in rxs:
                assert r.next(TIMEOUT)["ready"]
            pub.wait_for_receivers(3)
            for v in (1, 2):
                tensors = make_tensors(SPEC, 10 + v)
                assert pub.publish(tensors).receivers == 3
                for r in rxs:
                    assert _next_version(r, v)["digests"] == weights_digest(tensors)
                assert rx.wait_for_version(v) == v and weights_digest(local) == weights_digest(tensors)
    finally:
        _kill_all(*rxs)


def test_ucx_py_binding_round_trip_to_several_receivers():
    """The asyncio binding ucx-py (ucp) uses, driven through ucxx's identical API."""
    require("ucx")
    variant = "ucx-async"
    spec_path, rxs = write_spec(SPEC), []
    try:
        with WeightPublisher(_endpoint(variant), config=_config(variant)) as pub:
            rxs = [_receiver(variant, pub.endpoint, spec_path, until=2) for _ in range(2)]
            for r in rxs:
                assert r.next(TIMEOUT)["ready"]
            assert pub.transport._backend.name == "ucxx-async"
            pub.wait_for_receivers(2)
            for v in (1, 2):
                tensors = make_tensors(SPEC, 60 + v)
                assert pub.publish(tensors).receivers == 2
                for r in rxs:
                    assert _next_version(r, v)["digests"] == weights_digest(tensors)
    finally:
        _kill_all(*rxs)


def test_late_joiner_gets_the_current_version(variant):
    cls = publisher_class(_transport(variant))
    assert cls.late_join, cls.limits.get("late_join")
    spec_path, early, late = write_spec(SPEC), None, None
    try:
        with WeightPublisher(_endpoint(variant), config=_config(variant)) as pub:
            early = _receiver(variant, pub.endpoint, spec_path, until=3)
            early.next(TIMEOUT)
            pub.wait_for_receivers(1)
            for v in (1, 2):
                pub.publish(make_tensors(SPEC, 20 + v))
            v2 = make_tensors(SPEC, 22)
            late = _receiver(variant, pub.endpoint, spec_path, until=3)
            late.next(TIMEOUT)
            # No new publish: the late joiner catches up on version 2 by itself.
            assert _next_version(late, 2)["digests"] == weights_digest(v2)
            pub.wait_for_receivers(2)
            v3 = make_tensors(SPEC, 23)
            assert pub.publish(v3).receivers == 2
            for r in (early, late):
                assert _next_version(r, 3)["digests"] == weights_digest(v3)
    finally:
        _kill_all(early, late)


def test_receiver_killed_mid_version_is_bounded(variant):
    cls = publisher_class(_transport(variant))
    assert cls.survives_receiver_death, cls.limits.get("survives_receiver_death")
    spec_path, survivor, victim = write_spec(SPEC), None, None
    try:
        with WeightPublisher(_endpoint(variant), config=_config(variant)) as pub:
            survivor = _receiver(variant, pub.endpoint, spec_path, until=3)
            victim = _receiver(variant, pub.endpoint, spec_path, until=3, die_at="2:2")
            survivor.next(TIMEOUT), victim.next(TIMEOUT)
            pub.wait_for_receivers(2)
            pub.publish(make_tensors(SPEC, 31))
            t0 = time.monotonic()
            try:
                res = pub.publish(make_tensors(SPEC, 32))
                outcome = f"committed to {res.receivers}"
                assert res.receivers == 1  # the dead receiver was evicted from the version's quorum
            except (PeerLostError, SyncTimeoutError) as exc:
                outcome = type(exc).__name__
            assert time.monotonic() - t0 < TIMEOUT + 10, outcome
            assert victim.wait(TIMEOUT) != 0
            deadline = time.monotonic() + TIMEOUT
            while len(pub.receivers) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(pub.receivers) == 1
            v3 = make_tensors(SPEC, 33)
            assert pub.publish(v3).receivers == 1
            assert _next_version(survivor, 3)["digests"] == weights_digest(v3)
    finally:
        _kill_all(survivor, victim)


def test_corrupted_bucket_is_rejected(variant):
    spec_path, rx = write_spec(SPEC), None
    try:
        with WeightPublisher(_endpoint(variant), config=_config(variant)) as pub:
            rx = _receiver(variant, pub.endpoint, spec_path, until=3)
            rx.next(TIMEOUT)
            pub.wait_for_receivers(1)
            v1 = make_tensors(SPEC, 41)
            pub.publish(v1)
            assert _next_version(rx, 1)["digests"] == weights_digest(v1)
            post = pub.transport.post

            def corrupting_post(to, version, index, buf):
                if version == 2 and index == 1:
                    buf.mem[buf.length - 3] ^= 0x5A  # the bytes change after their checksum was taken
                post(to, version, index, buf)

            pub.transport.post = corrupting_post
            with pytest.raises(CorruptBucketError, match="checksum"):
                pub.publish(make_tensors(SPEC, 42))
            error = rx.next(TIMEOUT)
            assert error["error"] == "CorruptBucketError" and error["version"] == 1
            v3 = make_tensors(SPEC, 43)
            assert pub.publish(v3).version == 3
            assert _next_version(rx, 3)["digests"] == weights_digest(v3)
    finally:
        _kill_all(rx)


@pytest.mark.parametrize("window,cap_buckets", [(4, 2.5), (1, 0)])
def test_inflight_cap_is_never_exceeded(variant, window, cap_buckets):
    cls = publisher_class(_transport(variant))
    if not cls.pipelined:
        pytest.skip(f"not applicable to {cls.name}: {cls.limits['pipelined']}")
    cap = int(cap_buckets * ((1 << 20) + 4096))
    cfg = _config(variant, ipc_inflight_buckets=window, ipc_inflight_bytes=cap)
    spec = mixed_spec(n_small=4, big_elems=1_500_000)  # ~13 buckets of 1 MiB
    model = SpecModule(spec)
    with WeightPublisher(_endpoint(variant), config=cfg) as pub, \
            WeightReceiver(pub.endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        for v in (1, 2):
            tensors = make_tensors(spec, 50 + v)
            res = pub.publish(tensors)
            rx.wait_for_version(v)
            assert weights_digest(model) == weights_digest(tensors)
        stats = pub.transport.stats()
    assert res.buckets >= 10
    assert stats.buckets_posted >= 2 * res.buckets  # the marks below come from real transfers
    assert 1 <= stats.inflight_buckets_high <= window
    if cap:
        assert 0 < stats.inflight_bytes_high <= cap
    assert stats.inflight_buckets == 0 and stats.inflight_bytes == 0


@pytest.mark.parametrize("variant", ["torch", "ucx"])
def test_port_zero_binds_a_free_port_and_reports_it(variant):
    if VARIANTS[variant][2]:
        require(VARIANTS[variant][2])
    cfg = _config(variant)
    model, tensors = SpecModule(SPEC), make_tensors(SPEC, 80)
    with WeightPublisher("tcp://127.0.0.1:0", config=cfg) as pub:
        port = pub.endpoint.port
        assert port > 0 and str(pub.endpoint) == f"tcp://127.0.0.1:{port}"
        assert query_status(str(pub.endpoint), TIMEOUT)["publisher"]["endpoint"] == str(pub.endpoint)
        with pytest.raises(EndpointError, match=f"port {port} is in use"):
            WeightPublisher(str(pub.endpoint), config=cfg)  # the port really is this publisher's
        with WeightReceiver(pub.endpoint, model=model, config=cfg) as rx:
            pub.wait_for_receivers(1)
            assert pub.publish(tensors).receivers == 1  # torch: the group's store is found from here too
            rx.wait_for_version(1)
    assert weights_digest(model) == weights_digest(tensors)


@pytest.mark.parametrize("transport", ["torch", "ucx", "auto"])
def test_receiver_given_port_zero_is_refused(transport):
    with pytest.raises(EndpointError, match="port 0 asks a publisher to bind a free port"):
        WeightReceiver("tcp://127.0.0.1:0", model=SpecModule(SPEC), config=SyncConfig(transport=transport))


def test_port_zero_with_a_transport_that_binds_no_port_is_refused():
    with pytest.raises(EndpointError, match="port 0 needs a transport that listens on TCP"):
        WeightPublisher("tcp://127.0.0.1:0", config=SyncConfig(transport="auto"))


@pytest.mark.gpu
def test_torch_transport_nccl_round_trip():
    """The nccl group path (buckets staged through device memory); needs two CUDA devices."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (NCCL ranks must not share one)")
    spec_path, rx = write_spec(SPEC), None
    try:
        with WeightPublisher("tcp://127.0.0.1:0", config=_config("torch", torch_backend="nccl")) as pub:
            rx = Proc(["-m", "tests.procs.tx_receiver", "--endpoint", str(pub.endpoint), "--transport",
                       "torch", "--spec", spec_path, "--until", "1", "--timeout", str(TIMEOUT)],
                      env=child_env(CUDA_VISIBLE_DEVICES="1"))
            rx.next(TIMEOUT)
            pub.wait_for_receivers(1)
            tensors = make_tensors(SPEC, 70)
            pub.publish(tensors)
            assert _next_version(rx, 1)["digests"] == weights_digest(tensors)
    finally:
        _kill_all(rx)


def test_a_publisher_that_fails_to_start_frees_its_endpoint_at_once(variant):
    """The coordinator cannot be reached: the constructor fails with a typed error, and what it had
    already started (a bound port, mapped blocks, the status socket) is freed before it returns, so
    the same endpoint works right away, garbage collection or not."""
    ep = _endpoint(variant) if _transport(variant) == "shm" else f"tcp://127.0.0.1:{free_port()}"
    unreachable = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    bad = _config(variant, coord_backend="tcp", coord_endpoint=unreachable, timeout_s=2)
    kept = []
    with pytest.raises(HotweightsError) as exc:
        kept.append(WeightPublisher(ep, config=bad))
    assert unreachable.split("//")[1] in str(exc.value) or "coordinator" in str(exc.value).lower(), exc.value
    with WeightPublisher(ep, config=_config(variant, linger_s=0)) as pub:
        assert str(pub.endpoint) == ep
