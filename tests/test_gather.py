"""Grouped gathering and the packer's FLUSH protocol, in one process.

The collective gather itself (DeepSpeed ZeRO-3 on two real ranks) is exercised in
test_zero3_memory.py and test_recipes.py; here a gather is a context manager that, like ZeRO-3 after
a group is released, stops the tensors from holding their data -- it overwrites them in place -- so
any byte packed after the release would arrive corrupted.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from hotweights_trainer import HotweightsError, SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.integrations.gather import (ShardedSource, finish, plan_fingerprint, plan_groups,
                                                    publish_source)
from hotweights_trainer.integrations.pusher import StepPusher
from hotweights_trainer.source import FLUSH, iter_source
from hotweights_trainer.verify import weights_digest
from hotweights_trainer.wire.packer import plan_buckets

KIB = 1024


def named(sizes: list[int], dtype=torch.float32, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"t{i}", torch.randn(n, generator=g).to(dtype)) for i, n in enumerate(sizes)]


class ScramblingGather:
    """Counts enters/exits; on exit overwrites the group's tensors, as a released buffer would be."""

    def __init__(self) -> None:
        self.entered: list[list[str]] = []
        self.exited = 0
        self.names: dict[int, str] = {}

    @contextlib.contextmanager
    def __call__(self, tensors):
        self.entered.append([self.names.get(id(t), "?") for t in tensors])
        try:
            yield
        finally:
            self.exited += 1
            for t in tensors:
                t.fill_(float("nan"))


def scrambling_source(items, group_bytes, *, is_main=True):
    gather = ScramblingGather()
    gather.names = {id(t): n for n, t in items}
    return ShardedSource(plan_groups(items, group_bytes), is_main=is_main, gather=gather), gather


def test_plan_groups_bounds_each_group_and_keeps_order():
    items = named([100, 300, 50, 2000, 10, 10, 400])  # float32: 4 bytes each
    groups = plan_groups(items, 1600)
    assert [n for g in groups for n, _ in g] == [n for n, _ in items]
    for g in groups:
        total = sum(t.numel() * 4 for _, t in g)
        assert total <= 1600 or len(g) == 1  # an oversized tensor is a group of its own
    assert [[n for n, _ in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    assert plan_fingerprint(groups) == plan_fingerprint(plan_groups(items, 1600))
    assert plan_fingerprint(groups) != plan_fingerprint(plan_groups(items, 4000))
    with pytest.raises(HotweightsError):
        plan_groups(items, 0)


def test_planner_closes_bucket_at_flush_and_drops_its_references():
    items = named([1000, 1000, 1000])
    stream = [items[0], FLUSH, items[1], items[2], FLUSH]
    plans = plan_buckets(stream, bucket_bytes=64 * KIB)
    first = next(plans)
    assert [e.name for e in first.entries] == ["t0"]  # closed at FLUSH although far from full
    assert len(first.sources) == 1
    second = next(plans)
    assert first.sources == []  # the consumer moved on: the planner keeps nothing of group 0 alive
    assert [e.name for e in second.entries] == ["t1", "t2"]
    assert list(plans) == []


def test_iter_source_passes_flush_only_to_the_packer():
    stream = [("a", torch.ones(2)), FLUSH, ("b", torch.ones(2))]
    assert [x for x in iter_source(stream, flush_marks=True) if x is FLUSH] == [FLUSH]
    assert [n for n, _ in iter_source(stream)] == ["a", "b"]
    assert set(weights_digest(stream)) == {"a", "b"}


@pytest.mark.parametrize("bucket_kib,delta", [(4, "off"), (16, "off"), (64, "off"), (16, "auto")])
def test_every_group_is_packed_before_it_is_released(endpoint, bucket_kib, delta):
    """Both planners, dense and delta, close the bucket at FLUSH and pack it before reading on."""
    # Mixed sizes, including a tensor larger than a bucket (split) and groups smaller than a bucket.
    items = named([700, 1500, 90, 5000, 30, 30, 800, 1200, 10], seed=1)
    items += named([3000, 64], dtype=torch.bfloat16, seed=2)
    items += named([600_000, 20], seed=4)  # 2.4 MB: split across 1 MiB buckets inside its group
    items = [(f"{i}.{n}", t) for i, (n, t) in enumerate(items)]
    expected = {n: t.clone() for n, t in items}
    got: dict[str, torch.Tensor] = {}

    def apply(pairs):
        for name, t in pairs:
            got[name] = t.clone()

    cfg = SyncConfig(bucket_mb=1, timeout_s=20, delta=delta)
    with WeightPublisher(endpoint, config=cfg) as pub, \
            WeightReceiver(endpoint, apply=apply, config=cfg) as rx:
        pub.wait_for_receivers(1, timeout=20)
        # Groups much smaller than the 1 MiB bucket: without FLUSH several would share a bucket
        # that is packed only after they were released.
        src, gather = scrambling_source(items, bucket_kib * KIB)
        result = pub.publish(src, step=7)
        finish(src)
        rx.wait_for_version(1, timeout=20)
    assert gather.exited == len(src.groups) == src.stats.gathered_groups
    assert src.stats.drained_groups == 0
    assert result.buckets == len(src.groups) + 2  # a bucket per group, plus two for the split tensor
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name  # a NaN here means a byte was packed after release


def test_delta_ranges_sent_straight_from_the_source_are_packed_before_release(endpoint):
    # delta="auto": a large range whose elements all changed is sent dense, and the versions after
    # that read it straight from the source (no snapshot) -- so FLUSH must close the bucket there too.
    got: dict[str, torch.Tensor] = {}
    cfg = SyncConfig(bucket_mb=1, timeout_s=20, delta="auto")
    with WeightPublisher(endpoint, config=cfg) as pub, \
            WeightReceiver(endpoint, apply=lambda pairs: got.update((n, t.clone()) for n, t in pairs),
                           config=cfg) as rx:
        pub.wait_for_receivers(1, timeout=20)
        for version in (1, 2, 3):
            items = named([70_000, 100, 70_000, 70_000, 30], seed=10 + version)  # every element changes
            expected = {n: t.clone() for n, t in items}
            src, gather = scrambling_source(items, 300 * KIB)
            try:
                result = pub.publish(src, step=version)
            finally:
                finish(src)
            rx.wait_for_version(version, timeout=20)
            assert all(torch.equal(got[n], t) for n, t in expected.items()), version
            assert len(src.groups) == 3 and result.buckets == 3


def test_async_snapshot_of_a_sharded_source_is_taken_before_release(endpoint):
    from hotweights_trainer.async_publisher import AsyncPublisher

    items = named([700, 1500, 90, 5000, 30, 800], seed=5)
    expected = {n: t.clone() for n, t in items}
    got: dict[str, torch.Tensor] = {}
    cfg = SyncConfig(timeout_s=20, async_publish=True)
    with WeightPublisher(endpoint, config=cfg) as pub, \
            WeightReceiver(endpoint, apply=lambda pairs: got.update((n, t.clone()) for n, t in pairs),
                           config=cfg) as rx:
        pub.wait_for_receivers(1, timeout=20)
        apub = AsyncPublisher(pub)
        src, gather = scrambling_source(items, 8 * KIB)
        try:
            assert apub.submit(src, step=3)
        finally:
            finish(src)
        apub.close()
        rx.wait_for_version(1, timeout=20)
    assert len(gather.entered) == gather.exited == len(src.groups) > 1
    assert all(torch.equal(got[n], t) for n, t in expected.items())


def test_close_runs_the_gathers_a_failed_publish_skipped(endpoint):
    items = named([2000] * 4, seed=3)
    items.insert(2, ("bad", torch.zeros(3, dtype=torch.float8_e4m3fnuz)))  # no wire dtype: fails mid-way
    cfg = SyncConfig(timeout_s=20)
    with WeightPublisher(endpoint, config=cfg) as pub:
        src, gather = scrambling_source(items, 8100)
        with pytest.raises(HotweightsError, match="cannot be sent"):
            pub.publish(src)
        assert len(gather.entered) < len(src.groups)
        finish(src)
        finish(src)  # idempotent
    # Every group gathered exactly once, in order, and released: the other ranks are not left waiting.
    assert len(gather.entered) == len(src.groups) == gather.exited
    assert src.stats.drained_groups == len(src.groups) - 2
    with pytest.raises(HotweightsError, match="only once"):
        iter(src)


def test_non_main_rank_gathers_everything_and_sends_nothing():
    items = named([500] * 6)
    src, gather = scrambling_source(items, 4000, is_main=False)
    src.close()
    assert len(gather.entered) == len(src.groups) == 3 and gather.exited == 3


def test_publish_source_for_replicated_models():
    model = torch.nn.Linear(4, 4)
    assert publish_source(model, is_main=True, bucket_bytes=1 << 20) is model
    assert publish_source(model, is_main=False, bucket_bytes=1 << 20) is None
    wrapped = torch.compile(model)
    assert publish_source(wrapped, is_main=True, bucket_bytes=1 << 20) is model


def test_step_pusher_pushes_every_n_real_steps(endpoint):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    replica = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    cfg = SyncConfig(timeout_s=20)
    pusher = StepPusher(endpoint, every_n_steps=2, config=cfg, is_main=True)
    with pusher, WeightReceiver(endpoint, model=replica, config=cfg) as rx:
        pusher.wait_for_receivers(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            model(torch.randn(3, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            pusher.optimizer_stepped(model)
        assert [r.step for r in pusher.results] == [2, 4]
        assert pusher.push_final(model).step == 5
        assert pusher.push_final(model) is None  # already pushed
        rx.wait_for_version(3, timeout=20)
        assert weights_digest(replica) == weights_digest(model)


def test_step_pusher_off_main_rank_has_no_publisher():
    pusher = StepPusher("shm://never-bound", config=SyncConfig(timeout_s=5), is_main=False)
    assert pusher.publisher is None and pusher.wait_for_receivers(3) == 0
    assert pusher.push(torch.nn.Linear(2, 2)) is None
    pusher.close()


def test_integrations_reject_bad_arguments():
    from hotweights_trainer import ConfigError
    from hotweights_trainer.integrations.accelerate import AccelerateSync
    from hotweights_trainer.integrations.deepspeed import attach

    with pytest.raises(HotweightsError, match="Accelerator"):
        AccelerateSync(object(), "shm://x")
    with pytest.raises(HotweightsError, match="DeepSpeedEngine"):
        attach(torch.nn.Linear(2, 2), "shm://x")
    with pytest.raises(ConfigError, match="every_n_steps"):
        StepPusher("shm://x", every_n_steps=0, is_main=False)
