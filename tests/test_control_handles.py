"""Handles end to end: posted per version, acked on release, expired after the TTL, freed after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import torch

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver, metrics
from hotweights_trainer.control.coordinator import Coordinator
from hotweights_trainer.control.janitor import owner_is_dead
from hotweights_trainer.control.redis_store import RedisStore
from hotweights_trainer.errors import NotLeaderError
from tests.conftest import child_env, run_python
from tests.procs.common import make_tensors, mixed_spec
from tests.procs.spawn import Proc, write_spec
from tests.redis_server import redis_server  # noqa: F401 - fixture
from tests.test_control_fleet import receiver, wait_until


def blocks(name: str) -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"hwt.{name}.")}


def metric(name: str, endpoint: str) -> float:
    return metrics.snapshot().get(f'{name}{{endpoint="{endpoint}"}}', 0.0)


def test_handle_held_past_its_ttl_is_expired_and_its_block_unlinked(endpoint):
    name = endpoint.split("://")[1]
    spec = [["w", "float32", [4096]]]
    cfg = SyncConfig(bucket_mb=1, timeout_s=10, handle_ttl=1.0)
    inside, gate = threading.Event(), threading.Event()
    got: dict[str, torch.Tensor] = {}

    def stuck_apply(items):  # the serving engine hangs while loading version 1
        inside.set()
        gate.wait(30)
        got.update((n, t.clone()) for n, t in items)

    names = ("hotweights_handles_posted_total", "hotweights_handles_acked_total",
             "hotweights_handles_expired_total")
    before = {n: metric(n, endpoint) for n in names}
    with WeightPublisher(endpoint, config=cfg) as pub, \
            WeightReceiver(endpoint, apply=stuck_apply, config=cfg) as rx:
        pub.wait_for_receivers(1)
        v1 = make_tensors(spec, 1)
        pub.publish(v1)
        v1_block = blocks(name)
        assert len(v1_block) == 1 and pub.status()["handles_active"] == 1
        poller = threading.Thread(target=rx.wait_for_version, args=(1, 30), daemon=True)
        poller.start()
        assert inside.wait(10)
        for seed in (2, 3):  # the fleet moves on; version 1 stays held, no longer pinned
            pub.publish(make_tensors(spec, seed))
        # Version 1's handle outlives its TTL: it expires and its block is unlinked, not reused.
        wait_until(lambda: not (v1_block & blocks(name)), timeout=10, what="the expired block was unlinked")
        assert metric("hotweights_handles_expired_total", endpoint) - before[names[2]] == 1
        # The stuck receiver's mapping stays valid: when it resumes it still loads version 1 intact.
        gate.set()
        poller.join(10)
        assert torch.equal(got["w"], v1["w"])
        assert rx.wait_for_version(3) == 3 and torch.equal(got["w"], make_tensors(spec, 3)["w"])
        assert metric("hotweights_handles_posted_total", endpoint) - before[names[0]] == 3
        assert metric("hotweights_handles_acked_total", endpoint) - before[names[1]] >= 1
        assert metric("hotweights_handles_fetched_total", endpoint) >= 3  # the receiver opened 3 handles
        assert metric("hotweights_handles_active", endpoint) == pub.status()["handles_active"]


KILLED_PUBLISHER = r"""
import json, sys, time
from hotweights_trainer import SyncConfig, WeightPublisher
from tests.procs.common import load_spec, make_tensors
spec = load_spec(sys.argv[1])
pub = WeightPublisher(sys.argv[2], config=SyncConfig.from_env(bucket_mb=1, timeout_s=20))
pub.wait_for_receivers(1)
for seed in (1, 2):
    pub.publish(make_tensors(spec, seed))
print(json.dumps({"published": 2}), flush=True)
time.sleep(300)
"""


def test_after_sigkill_of_publisher_and_receiver_nothing_of_ours_stays_in_dev_shm_once_the_ttl_passed(
        endpoint, redis_server, tmp_path):
    name = endpoint.split("://")[1]
    spec = mixed_spec(n_small=4, big_elems=300_000)  # several buckets of 1 MiB
    spec_path = write_spec(spec)
    script = tmp_path / "pub.py"
    script.write_text(KILLED_PUBLISHER)
    ttl = 2.0
    env = dict(HOTWEIGHTS_COORD_BACKEND="redis", HOTWEIGHTS_REDIS_URL=redis_server.url,
               HOTWEIGHTS_HANDLE_TTL=str(ttl), HOTWEIGHTS_COORD_LEASE_MS="500")
    rx = receiver(endpoint, spec_path, 10)
    pub = Proc([str(script), spec_path, endpoint], env=child_env(**env))
    try:
        rx.next(90)
        assert pub.next(90)["published"] == 2
        assert [rx.next()["version"] for _ in range(2)] == [1, 2]
        for p in (rx, pub):  # nobody survives to notice the other's death
            os.kill(p.p.pid, signal.SIGKILL)
            p.wait(10)
        # Any hotweights process that starts meanwhile (another test, under xdist) may already have
        # reclaimed the dead owner's blocks (tests/test_shm_leaks.py covers that); the handles in
        # Redis are what only the janitor expires.
        left = blocks(name)
        # Before the TTL passes nothing is freed: the lease of the dead publisher may still be
        # running, and its handles have not expired yet.
        cfg = SyncConfig(coord_backend="redis", redis_url=redis_server.url, handle_ttl=ttl,
                         coord_lease_ms=500)
        coord = Coordinator(endpoint, cfg, RedisStore(endpoint, redis_server.url, lease_ms=500, timeout_s=5,
                                                      holder={"endpoint": "test"}, keep_alive=False))
        try:
            assert coord.op_janitor(owner_is_dead) == []
        except NotLeaderError:
            pass  # the dead publisher's lease has not run out yet
        finally:
            coord.close()
        assert blocks(name) <= left
        time.sleep(ttl + 0.5)
        out = run_python(["-m", "hotweights_trainer", "coord", "gc", "--fleet", endpoint, "--json"],
                         env=child_env(**env), timeout=60)
        report = json.loads(out.stdout)
        assert report["expired_handles"] and set(report["removed"]) <= left
        assert blocks(name) == set()
    finally:
        rx.kill()
        pub.kill()
