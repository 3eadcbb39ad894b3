"""Fleets of real receiver processes under the coordinator: quorum, eviction, catch-up, restarts.

Redis-backed cases run against a real ``redis-server`` started on a free port (tests/redis_server.py).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from hotweights_trainer import ManifestMismatchError, SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.errors import CoordinatorError
from hotweights_trainer.verify import weights_digest
from tests.conftest import child_env, require, run_python
from tests.procs.common import SpecModule, make_tensors, mixed_spec
from tests.procs import pause
from tests.procs.spawn import Proc, write_spec
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - fixture

FAST_HEARTBEAT = {"HOTWEIGHTS_HEARTBEAT_INTERVAL_S": "0.25", "HOTWEIGHTS_HEARTBEAT_TTL_S": "4.0"}


def receiver(endpoint: str, spec_path: str, versions: int, **env: str) -> Proc:
    return Proc(["-m", "tests.procs.fleet_receiver", "--endpoint", endpoint, "--spec", spec_path,
                 "--versions", str(versions), "--timeout", "40"], env=child_env(**{**FAST_HEARTBEAT, **env}))


def config(backend: str, redis_url: str | None = None, **kw) -> SyncConfig:
    base = dict(bucket_mb=1, timeout_s=20, coord_backend=backend, heartbeat_interval_s=0.25,
                heartbeat_ttl_s=4.0, coord_lease_ms=600)
    if redis_url:
        base["redis_url"] = redis_url
    return SyncConfig(**{**base, **kw})


def wait_until(fn, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        time.sleep(0.05)


def cli_status(endpoint: str, *args: str) -> dict:
    out = run_python(["-m", "hotweights_trainer", "status", endpoint, "--json", *args], timeout=60)
    return json.loads(out.stdout)


def kill_all(*procs) -> None:
    for p in procs:
        if p is not None:
            try:
                os.kill(p.p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # already gone
            p.kill()


@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_three_receivers_move_together_and_a_late_joiner_catches_up(endpoint, backend, tmp_path):
    redis = None
    if backend == "redis":
        require("redis")
        redis = RedisServer(tmp_path).start()
    spec = mixed_spec(n_small=10, big_elems=200_000)
    path = write_spec(spec)
    rxs = [receiver(endpoint, path, 10) for _ in range(3)]
    late = None
    try:
        for r in rxs:
            assert r.next(90)["ready"]
        with WeightPublisher(endpoint, config=config(backend, redis and redis.url)) as pub:
            pub.wait_for_receivers(3)
            for seed in (1, 2):
                tensors = make_tensors(spec, seed)
                res = pub.publish(tensors, step=seed)
                assert (res.version, res.receivers) == (seed, 3)
                for r in rxs:
                    got = r.next()
                    assert got["version"] == seed and got["digests"] == weights_digest(tensors)
            late = receiver(endpoint, path, 10)
            assert late.next(90)["ready"]
            got = late.next()  # the current version, in full, without a new publish
            assert got["version"] == 2 and got["digests"] == weights_digest(make_tensors(spec, 2))
            v3 = make_tensors(spec, 3)
            assert pub.publish(v3, step=3).receivers == 4
            for r in rxs + [late]:
                assert r.next()["digests"] == weights_digest(v3)
            wait_until(lambda: [m["live_version"] for m in pub.status()["receivers"]] == [3] * 4,
                       what="every receiver reported live version 3")
            if backend == "redis":
                st = cli_status(endpoint, "--backend", "redis", "--redis-url", redis.url)
            else:
                st = cli_status(endpoint, "--backend", "embedded")
            assert st["committed"] == 3 and st["committed_step"] == 3 and st["open"] is None
            assert len(st["receivers"]) == 4 and all(m["lag"] == 0 for m in st["receivers"])
            assert all(m["heartbeat_age_s"] < 5 for m in st["receivers"])
            assert [r["outcome"] for r in st["recent"]] == ["committed"] * 3
    finally:
        kill_all(*rxs, late)
        if redis is not None:
            redis.stop()


def test_one_receiver_fails_to_stage_and_nobody_applies_the_version(endpoint, redis_server):
    base = mixed_spec(n_small=6, big_elems=50_000)
    extra = ["extra.w", "float32", [64]]
    good, bad = write_spec(base + [extra]), write_spec(base)
    a, b, c = receiver(endpoint, good, 2), receiver(endpoint, good, 2), receiver(endpoint, bad, 2)
    try:
        for r in (a, b, c):
            r.next(90)
        with WeightPublisher(endpoint, config=config("redis", redis_server.url)) as pub:
            pub.wait_for_receivers(3)
            v1 = make_tensors(base, 1)
            assert pub.publish(v1).receivers == 3
            for r in (a, b, c):
                assert r.next()["version"] == 1
            v2 = {**make_tensors(base, 2), "extra.w": make_tensors([extra], 2)["extra.w"]}
            with pytest.raises(ManifestMismatchError, match="extra.w"):
                pub.publish(v2)  # c cannot stage it: unknown name
            assert c.next()["error"] == "ManifestMismatchError"
            v3 = make_tensors(base, 3)
            assert pub.publish(v3).version == 3
            for r in (a, b):  # they staged version 2 fine, yet never applied it
                got = r.next()
                assert got["version"] == 3 and got["applied"] == 2
                assert {k: got["digests"][k] for k in v3} == weights_digest(v3)
            assert c.next()["version"] == 3
            st = pub.status()
            assert st["counters"]["quorum_failures"] == 1
            assert [(r["version"], r["outcome"]) for r in st["recent"]] == [(1, "committed"), (2, "aborted"),
                                                                             (3, "committed")]
    finally:
        kill_all(a, b, c)


def test_receiver_killed_mid_version_and_a_frozen_one_are_evicted_the_rest_commit(endpoint, redis_server):
    spec = mixed_spec(n_small=20, big_elems=100_000)
    path = write_spec(spec)
    a, b, killed, frozen = (receiver(endpoint, path, 4) for _ in range(4))
    try:
        for r in (a, b, killed, frozen):
            r.next(90)
        cfg = config("redis", redis_server.url, timeout_s=30, heartbeat_ttl_s=2.0)
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(4)
            pub.publish(make_tensors(spec, 1))
            for r in (a, b, killed, frozen):
                assert r.next()["version"] == 1

            def killing_source():
                for i, item in enumerate(make_tensors(spec, 2).items()):
                    if i == len(spec) // 2:
                        os.kill(killed.p.pid, signal.SIGKILL)
                        time.sleep(0.3)
                    yield item

            assert pub.publish(killing_source()).receivers == 3
            for r in (a, b, frozen):
                assert r.next()["version"] == 2
            # A frozen receiver keeps its socket open but stops heartbeating: evicted after the TTL,
            # the version commits without it -- long before the 30 s staging deadline.
            pause.stop(frozen.p.pid)
            t0 = time.monotonic()
            v3 = make_tensors(spec, 3)
            assert pub.publish(v3).receivers == 2
            assert time.monotonic() - t0 < 15
            st = pub.status()
            assert st["counters"]["evictions"] >= 1 and len(st["receivers"]) == 2
            for r in (a, b):
                assert r.next()["digests"] == weights_digest(v3)
            # Thawed, it finds itself disconnected, reconnects and catches up to the current version.
            os.kill(frozen.p.pid, signal.SIGCONT)
            got = frozen.next(30)
            assert got["version"] == 3 and got["digests"] == weights_digest(v3)
    finally:
        kill_all(a, b, killed, frozen)


RESTARTED_PUBLISHER = r"""
import json, sys, time
from hotweights_trainer import SyncConfig, WeightPublisher
from tests.procs.common import load_spec, make_tensors
spec = load_spec(sys.argv[1])
pub = WeightPublisher(sys.argv[2], config=SyncConfig.from_env(bucket_mb=1, timeout_s=20))
pub.wait_for_receivers(1)
for seed in (1, 2, 3):
    res = pub.publish(make_tensors(spec, seed), step=seed)
    print(json.dumps({"version": res.version, "receivers": res.receivers}), flush=True)
time.sleep(300)
"""


def test_publisher_restart_resumes_from_redis_and_receivers_keep_serving(endpoint, redis_server, tmp_path):
    spec = mixed_spec(n_small=5, big_elems=20_000)
    script = tmp_path / "pub.py"
    script.write_text(RESTARTED_PUBLISHER)
    env = child_env(HOTWEIGHTS_COORD_BACKEND="redis", HOTWEIGHTS_REDIS_URL=redis_server.url,
                    HOTWEIGHTS_COORD_LEASE_MS="600")
    model = SpecModule(spec)
    cfg = config("redis", redis_server.url)
    with WeightReceiver(endpoint, model=model, config=cfg) as rx:
        first = Proc([str(script), write_spec(spec), endpoint], env=env)
        try:
            assert [first.next(60)["version"] for _ in range(3)] == [1, 2, 3]
            assert rx.wait_for_version(3) == 3
            os.kill(first.p.pid, signal.SIGKILL)
            first.wait(10)
        finally:
            first.kill()
        v3 = weights_digest(make_tensors(spec, 3))
        time.sleep(0.5)
        assert rx.version == 3 and weights_digest(model) == v3  # still serving what it had
        # The new publisher waits out the dead one's lease, then resumes the fleet from Redis.
        with WeightPublisher(endpoint, config=cfg) as pub:
            assert pub.version == 3  # known from Redis before any receiver reconnected
            st = pub.status()
            assert st["epoch"] == 2 and st["committed_step"] == 3
            pub.wait_for_receivers(1)
            v4 = make_tensors(spec, 4)
            assert pub.publish(v4).version == 4
            assert rx.wait_for_version(4) == 4 and weights_digest(model) == weights_digest(v4)


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_redis_restart_recovers_state_or_fails_loudly(endpoint, tmp_path, persistent):
    require("redis")
    redis = RedisServer(tmp_path, persistent=persistent).start()
    spec = [["w", "float32", [256]]]
    model = SpecModule(spec)
    cfg = config("redis", redis.url, timeout_s=5)
    try:
        with WeightReceiver(endpoint, model=model, config=cfg) as rx:
            with WeightPublisher(endpoint, config=cfg) as pub:
                pub.wait_for_receivers(1)
                for seed in (1, 2):
                    pub.publish(make_tensors(spec, seed))
                assert rx.wait_for_version(2) == 2
                redis.restart()  # SIGKILL and start again on the same port
                v3 = make_tensors(spec, 3)
                if persistent:
                    assert pub.publish(v3).version == 3
                    assert rx.wait_for_version(3) == 3 and weights_digest(model) == weights_digest(v3)
                    return
                for _ in range(2):  # loudly, every time: never a silent restart from version 1
                    with pytest.raises(CoordinatorError, match="no longer holds the state"):
                        pub.publish(v3)
                time.sleep(0.3)
                assert rx.poll() is None and rx.version == 2
                assert weights_digest(model) == weights_digest(make_tensors(spec, 2))
            # A new publisher starts a new state generation, numbering above what receivers run.
            with WeightPublisher(endpoint, config=cfg) as pub:
                pub.wait_for_receivers(1)
                assert pub.publish(v3).version == 3
                assert rx.wait_for_version(3) == 3 and weights_digest(model) == weights_digest(v3)
    finally:
        redis.stop()


def test_majority_quorum_commits_without_a_rejecting_receiver_and_disconnects_it(endpoint):
    spec = [["w", "float32", [64]]]
    cfg = config("embedded", quorum="majority", timeout_s=10)
    models = [SpecModule(spec), SpecModule(spec)]
    odd = SpecModule([["w", "float16", [64]]])  # cannot take float32 "w": rejects every version
    with WeightPublisher(endpoint, config=cfg) as pub, \
            WeightReceiver(endpoint, model=models[0], config=cfg) as a, \
            WeightReceiver(endpoint, model=models[1], config=cfg) as b, \
            WeightReceiver(endpoint, model=odd, config=cfg) as c:
        pub.wait_for_receivers(3)
        v1 = make_tensors(spec, 1)
        res = pub.publish(v1)
        assert res.version == 1 and res.receivers == 2
        for rx, m in ((a, models[0]), (b, models[1])):
            assert rx.wait_for_version(1) == 1 and weights_digest(m) == weights_digest(v1)
        # The majority's commit can come before the odd receiver has staged (and rejected) its copy.
        deadline = time.monotonic() + 10
        with pytest.raises(ManifestMismatchError):
            while time.monotonic() < deadline:
                c.poll()
                time.sleep(0.05)
        assert c.version == 0
        st = pub.status()
        assert st["recent"][-1]["outcome"] == "committed" and st["counters"]["quorum_failures"] == 0


def test_status_command_renders_the_fleet_from_a_tcp_coordinator(capsys):
    from hotweights_trainer.cli import main
    from hotweights_trainer.control.client import CoordClient
    from hotweights_trainer.control.server import CoordServer
    from hotweights_trainer.control.session import FleetSession

    server = CoordServer("tcp://127.0.0.1:0", SyncConfig(timeout_s=5)).start()
    client = CoordClient([("127.0.0.1", server.port)], token=None, timeout_s=5, max_message_bytes=1 << 20)
    try:
        s = FleetSession("shm://shown", lambda m, a: client.call("shm://shown", m, a), "tcp")
        s.claim({"who": "test"})
        s.register("host:1:1", 1, "host", 0)
        s.register("host:2:1", 2, "host", 0)
        v = s.begin(5).version
        s.seal(v, "d", 1)
        for rid in ("host:1:1", "host:2:1"):
            s.precommit(rid, v, "d")
        s.commit(v)
        s.heartbeat("host:1:1", v)
        coord = f"tcp://127.0.0.1:{server.port}"
        assert main(["status", "shm://shown", "--backend", "tcp", "--coord", coord]) == 0
        text = capsys.readouterr().out
        assert "committed version 1 (step 5)" in text and "2 receiver(s)" in text
        row = next(line for line in text.splitlines() if "host:2:1" in line)
        assert row.split()[2:4] == ["0", "1"]  # live version 0, lag 1
        assert main(["status", "shm://shown", "--backend", "tcp", "--coord", coord, "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert {r["rid"]: r["lag"] for r in st["receivers"]} == {"host:1:1": 0, "host:2:1": 1}
        assert st["coordinator"] == coord
    finally:
        client.close()
        server.close()
