"""Host relays on one host, in one process: the hooks and the commit rule without namespaces.

The publisher speaks ``torch`` over loopback TCP (a network transport, forced: ``auto`` would pick
shared memory on loopback), the relay republishes on ``shm://``. Real transports, real threads.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import torch

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.control.state import FleetState
from hotweights_trainer.errors import RelayError, StaleVersionError, VersionAbortedError
from hotweights_trainer.relay.node import HostRelay
from hotweights_trainer.verify import combined_digest, weights_digest
from tests.conftest import free_port
from hotweights_trainer.wire.bucket import decode_bucket, restamp
from hotweights_trainer.wire.packer import pack_into, plan_buckets


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(300_000, generator=g),
            "b.weight": torch.randn(64, 64, generator=g).bfloat16()}


class _Store:
    def __init__(self):
        self.held: dict[str, torch.Tensor] = {}

    def __call__(self, items) -> None:
        for name, t in items:
            self.held[name] = t.clone()

    def digest(self) -> str:
        return combined_digest(weights_digest(self.held))


@pytest.fixture
def fleet():
    cfg = SyncConfig(transport="torch", timeout_s=20, bucket_mb=1)
    local = f"shm://t-relay-{uuid.uuid4().hex[:12]}"
    pub = WeightPublisher("tcp://127.0.0.1:0", config=cfg)
    relay = HostRelay(str(pub.endpoint), [local], config=cfg)
    stop = threading.Event()
    runner = threading.Thread(target=relay.serve, args=(stop,), daemon=True)
    runner.start()
    opened: list[WeightReceiver] = []

    def receiver(**kw) -> WeightReceiver:
        rx = WeightReceiver(local, config=SyncConfig(timeout_s=20), **kw)
        opened.append(rx)
        return rx

    try:
        pub.wait_for_receivers(1, timeout=20)
        yield pub, relay, receiver
    finally:
        for rx in opened:
            rx.close()
        stop.set()
        runner.join(timeout=10)
        relay.close()
        pub.close()


def test_relay_passes_every_version_bit_exact_under_the_same_number(fleet):
    pub, relay, receiver = fleet
    stores = [_Store(), _Store()]
    rxs = [receiver(apply=s) for s in stores]
    relay.publishers[0].wait_for_receivers(2, timeout=20)
    for seed in (1, 2, 3):
        w = _weights(seed)
        res = pub.publish(w, step=seed)
        assert res.receivers == 1  # the publisher sent one copy: to the relay
        for rx, store in zip(rxs, stores):
            assert rx.wait_for_version(res.version, timeout=20) == res.version
            assert rx.step == seed
            assert store.digest() == combined_digest(weights_digest(w))
    assert relay.version == 3
    assert pub.status()["relays"][relay.receiver.receiver_id]["host"] == relay.host


def test_a_rejection_behind_the_relay_aborts_the_version_upstream(fleet):
    pub, relay, receiver = fleet
    good = _Store()
    rx_good = receiver(apply=good)
    pub.publish(_weights(1))
    rx_good.wait_for_version(1, timeout=20)
    # A receiver whose model has another shape for a.weight rejects every version behind the relay.
    receiver(model=_Model(300_001))
    relay.publishers[0].wait_for_receivers(2, timeout=20)
    with pytest.raises(VersionAbortedError) as exc:
        pub.publish(_weights(2))
    assert "RelayError" in str(exc.value) and "a.weight" in str(exc.value)
    assert rx_good.poll() is None and rx_good.version == 1  # nobody applied version 2
    assert good.digest() == combined_digest(weights_digest(_weights(1)))


class _Model(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.a = torch.nn.Module()
        self.a.weight = torch.nn.Parameter(torch.zeros(n))
        self.b = torch.nn.Module()
        self.b.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.bfloat16))


def test_late_joiner_behind_the_relay_catches_up(fleet):
    pub, relay, receiver = fleet
    w = _weights(7)
    res = pub.publish(w)
    late = _Store()
    rx = receiver(apply=late)
    assert rx.wait_for_version(res.version, timeout=20) == res.version
    assert late.digest() == combined_digest(weights_digest(w))


def test_relay_error_is_a_typed_hotweights_error():
    assert issubclass(RelayError, RuntimeError)


def test_begin_min_version_keeps_upstream_numbers_and_never_goes_back():
    s = FleetState("f", quorum="all", heartbeat_ttl_s=5, version_timeout_s=5, handle_ttl_s=5)
    epoch = s.claim(0.0)
    assert s.begin(epoch, None, 0.0, min_version=5)["version"] == 5
    # Never backwards, and never renumbered: a relayed number already passed is refused, and the
    # refusal opens nothing and takes no number (the next upstream version keeps its own).
    with pytest.raises(StaleVersionError, match="relayed version 2 is already numbered past"):
        s.begin(epoch, None, 0.0, min_version=2)
    assert s.open is not None and s.open.version == 5
    assert s.begin(epoch, None, 0.0, min_version=6)["version"] == 6
    assert s.begin(epoch, None, 0.0)["version"] == 7
    # A receiver that registers running version 9 (its relay restarted): version 9 is refused too.
    s.register(epoch, "r1", 1, "h", 9, 0.0)
    with pytest.raises(StaleVersionError):
        s.begin(epoch, None, 0.0, min_version=9)
    assert s.begin(epoch, None, 0.0, min_version=10)["version"] == 10


def test_restamp_changes_version_and_session_and_keeps_the_bucket_valid():
    plan = next(iter(plan_buckets(iter(_weights(3).items()), 8 << 20, None)))
    buf = memoryview(bytearray(plan.total_len))
    pack_into(buf, plan, version=4, index=0, session=11)
    restamp(buf, version=9, session=77)
    header = decode_bucket(buf)  # checks both checksums
    assert (header.version, header.session) == (9, 77)


def test_relay_command_text_output_follows_a_publisher():
    """``hotweights relay`` as a user runs it (text mode; the netns tests use --json)."""
    import subprocess
    import sys

    from tests.conftest import ROOT, child_env
    from tests.procs.warm import popen

    local = f"shm://t-relay-{uuid.uuid4().hex[:12]}"
    cfg = SyncConfig(transport="torch", timeout_s=30, bucket_mb=1)
    with WeightPublisher("tcp://127.0.0.1:0", config=cfg) as pub:
        up = str(pub.endpoint)
        proc = popen([sys.executable, "-m", "hotweights_trainer", "relay", "--upstream", up, "--local", local,
                      "--transport", "torch", "--timeout", "30", "--versions", "1"],
                     # no receiver ever joins the relay's local endpoint: do not linger for one
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env=child_env(HOTWEIGHTS_LINGER_S="0"), cwd=ROOT)
        try:
            pub.wait_for_receivers(1, timeout=60)
            res = pub.publish(_weights(5))
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "relay: event ready, host" in out and f"upstream {up}" in out
    assert f"relay: event version, version {res.version}" in out


def test_restarted_relay_keeps_every_version_number(fleet):
    """A relay that restarts is sent the last committed version (catch-up) while the receivers behind
    it still run that very version: it must not pass it on under a new number, or every later version
    on this host would be numbered differently from the publisher's."""
    pub, relay, receiver = fleet
    store = _Store()
    rx = receiver(apply=store)
    relay.publishers[0].wait_for_receivers(1, timeout=20)
    first = pub.publish(_weights(1))
    assert rx.wait_for_version(first.version, timeout=20) == first.version
    local = relay.downstream[0]
    relay.close()
    # The restarted relay first follows an upstream that is down and routes around it to the
    # publisher once heartbeat_ttl_s passed: by then the receiver behind it is back and registered,
    # running version 1, when the catch-up of version 1 arrives (the order the netns test hits).
    cfg = SyncConfig(transport="torch", timeout_s=20, bucket_mb=1, heartbeat_ttl_s=3)
    upstreams = [f"tcp://127.0.0.1:{free_port()}", str(pub.endpoint)]
    with HostRelay(upstreams, [local], config=cfg) as again:
        stop = threading.Event()
        runner = threading.Thread(target=again.serve, args=(stop,), daemon=True)
        runner.start()
        try:
            again.publishers[0].wait_for_receivers(1, timeout=20)
            assert again.publishers[0].status()["committed"] == 0
            pub.wait_for_receivers(1, timeout=20)
            for seed in (2, 3):
                w = _weights(seed)
                res = pub.publish(w)
                assert rx.wait_for_version(res.version, timeout=20) == res.version
                assert store.digest() == combined_digest(weights_digest(w))
            assert again.version == res.version
            assert again.publishers[0].status()["committed"] == res.version
        finally:
            stop.set()
            runner.join(timeout=10)
