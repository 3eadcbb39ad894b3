"""HA control plane against a real redis-server: leases, fencing, coordinator failover, token auth."""

from __future__ import annotations

import json
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

from hotweights_trainer import (ConfigError, SyncConfig, WeightPublisher, WeightReceiver, WireFormatError,
                                metrics)
from hotweights_trainer.control.client import CoordClient
from hotweights_trainer.control.coordinator import Coordinator
from hotweights_trainer.control.lease import Lease, LeaseKeeper
from hotweights_trainer.control.redis_store import RedisStore, connect
from hotweights_trainer.control.server import CoordServer
from hotweights_trainer.control.session import FleetSession
from hotweights_trainer.errors import AuthError, FencedError, NotLeaderError
from hotweights_trainer.verify import weights_digest
from tests.conftest import ROOT, child_env
from tests.procs.warm import popen
from tests.redis_server import redis_server  # noqa: F401 - fixture


def test_lease_is_never_lost_to_its_holder_and_taken_over_only_after_expiry(redis_server):
    client = connect(redis_server.url, 5)
    a = Lease(client, "t:", {"id": "a"}, 300, "f")
    b = Lease(client, "t:", {"id": "b"}, 300, "f")
    assert a.try_acquire()
    keeper = LeaseKeeper(a)
    token = a.token
    t_end = time.monotonic() + 2.0  # more than six lease periods
    while time.monotonic() < t_end:
        assert not b.try_acquire()
        assert a.valid() and a.token == token
        time.sleep(0.05)
    keeper.stop()  # the holder stops renewing (as if it froze); it does not release
    while not b.try_acquire():
        time.sleep(0.01)
    assert not a.valid()  # the old holder's own clock had already ended its tenure
    assert b.token == token + 1
    assert not a.renew()  # and it cannot take the lease back
    assert a.token == 0 and b.valid()
    client.close()


def test_write_from_a_deposed_coordinator_is_fenced(redis_server):
    cfg = SyncConfig(coord_lease_ms=300, timeout_s=5)
    stores = [RedisStore("shm://f", redis_server.url, lease_ms=300, timeout_s=5, holder={"endpoint": n},
                         keep_alive=False) for n in ("c1", "c2")]
    c1, c2 = (Coordinator("shm://f", cfg, s) for s in stores)
    e1 = c1.op_claim({"who": "p1"})["epoch"]
    assert c1.op_begin(e1, None)["version"] == 1
    with pytest.raises(NotLeaderError) as info:
        c2.op_status()
    assert info.value.leader == "c1"
    time.sleep(0.35)  # c1 froze past its lease (no keeper renews it)
    assert c2.op_claim({"who": "p2"})["epoch"] == e1 + 1
    # c1 wakes up believing it still leads: the fence check inside the write script refuses it.
    stores[0].lease._valid_until = time.monotonic() + 60
    with pytest.raises(FencedError, match="another coordinator holds the fence"):
        c1.op_seal(e1, 1, "d", 1)
    status = c2.op_status()
    assert status["epoch"] == e1 + 1 and status["open"] is None and status["recent"][-1]["kind"] == "restart"
    for c in (c1, c2):
        c.close()


_ACQ = re.compile(r"lease acquired: fleet=(\S+) token=(\d+) holder=(\S+) t=([\d.]+) valid_until=([\d.]+)")
_REN = re.compile(r"lease renewed: fleet=(\S+) token=(\d+) valid_until=([\d.]+)")
_END = re.compile(r"lease (?:released|lost): fleet=(\S+)(?: token=\d+)? t=([\d.]+)")


def tenures(log: str) -> list[dict]:
    """Leadership intervals of one process from its lease audit log: [acquired, last valid_until]."""
    out: list[dict] = []
    for line in log.splitlines():
        if m := _ACQ.search(line):
            out.append({"token": int(m[2]), "start": float(m[4]), "end": float(m[5]), "renewals": 0})
        elif (m := _REN.search(line)) and out and out[-1]["token"] == int(m[2]):
            out[-1]["end"] = max(out[-1]["end"], float(m[3]))
            out[-1]["renewals"] += 1
        elif (m := _END.search(line)) and out:
            out[-1]["end"] = min(out[-1]["end"], float(m[2]))
    return out


class CoordServe:
    """``hotweights -vv coord serve`` in a child process; its log (the lease audit trail) goes to a file."""

    def __init__(self, redis_url: str, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.p = popen(
            [sys.executable, "-m", "hotweights_trainer", "-vv", "coord", "serve", "--store", "redis",
             "--redis-url", redis_url, "--endpoint", "tcp://127.0.0.1:0"],  # ready() says the port
            stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
            env=child_env(HOTWEIGHTS_COORD_LEASE_MS="600", HOTWEIGHTS_COORD_TOKEN="fleet-secret"))

    def ready(self, timeout: float = 60) -> dict:
        with selectors.DefaultSelector() as sel:
            sel.register(self.p.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"coord serve did not start within {timeout}s:\n{self.log()}")
        return json.loads(self.p.stdout.readline())

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        self.p.wait(20)
        self.p.stdout.close()
        self._log.close()


def test_killing_the_leader_coordinator_hands_over_without_two_leaders(endpoint, redis_server, tmp_path):
    servers = [CoordServe(redis_server.url, tmp_path / f"coord{i}.log") for i in range(2)]
    try:
        ports = [int(s.ready()["serving"].rsplit(":", 1)[1]) for s in servers]
        cfg = SyncConfig(coord_backend="tcp", coord_endpoint=",".join(f"tcp://127.0.0.1:{p}" for p in ports),
                         coord_token="fleet-secret", coord_lease_ms=600, timeout_s=15, bucket_mb=1)
        model = torch.nn.Linear(8, 8)
        target = torch.nn.Linear(8, 8)
        with WeightPublisher(endpoint, config=cfg) as pub, \
                WeightReceiver(endpoint, model=target, config=cfg) as rx:
            pub.wait_for_receivers(1)
            for v in (1, 2):
                with torch.no_grad():
                    model.weight.add_(1.0)
                assert pub.publish(model).version == v
                time.sleep(1.0)  # several lease periods: the leader renews, never re-acquires
            leader = pub.status()["store"]["leader"]["endpoint"]
            dead = ports.index(int(leader.rsplit(":", 1)[1]))
            servers[dead].stop(signal.SIGKILL)
            with torch.no_grad():
                model.weight.add_(1.0)
            t0 = time.monotonic()
            assert pub.publish(model).version == 3  # numbering continues from Redis on the new leader
            assert time.monotonic() - t0 < 10
            assert rx.wait_for_version(3) == 3 and weights_digest(target) == weights_digest(model)
            st = pub.status()
            assert st["store"]["leader"]["endpoint"] == f"tcp://127.0.0.1:{ports[1 - dead]}"
            assert st["committed"] == 3 and st["epoch"] == 1  # the same publisher epoch throughout
        servers[1 - dead].stop(signal.SIGTERM)
        first, second = tenures(servers[dead].log()), tenures(servers[1 - dead].log())
        assert len(first) == 1 and first[0]["renewals"] >= 3  # one tenure, renewed, never lost to itself
        assert len(second) == 1
        assert second[0]["token"] > first[0]["token"]
        assert second[0]["start"] >= first[0]["end"]  # no moment with two leaders
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)


def test_stale_publisher_is_fenced_through_the_tcp_coordinator():
    cfg = SyncConfig(coord_token="t0k", timeout_s=5)
    server = CoordServer("tcp://127.0.0.1:0", cfg).start()
    clients = [CoordClient([("127.0.0.1", server.port)], token="t0k", timeout_s=5, max_message_bytes=1 << 20)
               for _ in range(2)]
    try:
        old, new = (FleetSession("shm://fenced", (lambda c: lambda m, a: c.call("shm://fenced", m, a))(c),
                                 "tcp") for c in clients)
        old.claim({"who": "old"})
        v = old.begin(None).version
        old.seal(v, "d", 1)
        new.claim({"who": "new"})
        with pytest.raises(FencedError, match="stale"):
            old.commit(v)
        with pytest.raises(FencedError):
            old.begin(None)
        assert new.begin(None).version == v + 1
    finally:
        for c in clients:
            c.close()
        server.close()


def test_coordinator_refuses_requests_without_the_token_and_counts_them():
    cfg = SyncConfig(coord_token="right", timeout_s=5)
    server = CoordServer("tcp://127.0.0.1:0", cfg).start()
    before = metrics.snapshot()
    try:
        for token in (None, "wrong"):
            c = CoordClient([("127.0.0.1", server.port)], token=token, timeout_s=5, max_message_bytes=1 << 20)
            with pytest.raises(AuthError, match="missing token" if token is None else "wrong token"):
                c.call("shm://auth", "claim", {"owner": {}})
            status = c.call("shm://auth", "status", {})  # read-only: allowed
            assert status["epoch"] == 0
            c.close()
        assert status["refused_requests"] == 2
        after = metrics.snapshot()
        for reason in ("missing token", "wrong token"):
            key = f'hotweights_refused_requests_total{{endpoint="shm://auth",reason="{reason}"}}'
            assert after[key] - before.get(key, 0.0) == 1
        ok = CoordClient([("127.0.0.1", server.port)], token="right", timeout_s=5, max_message_bytes=1 << 20)
        assert ok.call("shm://auth", "claim", {"owner": {}})["epoch"] == 1
        ok.close()
        # A malformed frame is refused and the connection dropped; nothing is unpickled or trusted.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            body = b"\x80\x04not json"
            s.sendall(struct.pack("<I", len(body)) + body)
            assert s.recv(100) == b""
        assert server.refused == 3
    finally:
        server.close()
    with pytest.raises(ConfigError, match="non-loopback"):
        CoordServer("tcp://0.0.0.0:0", SyncConfig())


def test_publisher_refuses_receivers_without_the_token(endpoint):
    cfg = SyncConfig(coord_token="s3cret", timeout_s=5, bucket_mb=1)
    with WeightPublisher(endpoint, config=cfg) as pub:
        with WeightReceiver(endpoint, model=torch.nn.Linear(2, 2), config=SyncConfig(timeout_s=5)) as bad:
            t0 = time.monotonic()
            with pytest.raises(AuthError, match="missing token"):
                bad.wait_for_version(1)
            assert time.monotonic() - t0 < 5
        assert pub.status()["publisher"]["refused_requests"] == 1 and pub.receivers == []
        target = torch.nn.Linear(2, 2)
        with WeightReceiver(endpoint, model=target, config=cfg) as good:
            pub.wait_for_receivers(1)
            src = torch.nn.Linear(2, 2)
            pub.publish(src)
            assert good.wait_for_version(1) == 1 and torch.equal(target.weight, src.weight)


def test_handles_are_hmac_signed_and_a_wrong_key_rejects_the_version(endpoint):
    cfg = SyncConfig(handle_token="k1", timeout_s=5, bucket_mb=1)
    with WeightPublisher(endpoint, config=cfg) as pub:
        with WeightReceiver(endpoint, model=torch.nn.Linear(2, 2), config=cfg.replace(handle_token="k2")):
            pub.wait_for_receivers(1)
            with pytest.raises(WireFormatError, match="signature"):
                pub.publish(torch.nn.Linear(2, 2))
        target = torch.nn.Linear(2, 2)
        with WeightReceiver(endpoint, model=target, config=cfg) as rx:
            pub.wait_for_receivers(1)
            src = torch.nn.Linear(2, 2)
            assert pub.publish(src).receivers == 1
            assert rx.wait_for_version(2) == 2 and torch.equal(target.weight, src.weight)


def test_coordinator_restart_with_redis_continues_numbering(endpoint, redis_server):
    base = dict(redis_url=redis_server.url, coord_lease_ms=600, timeout_s=10, bucket_mb=1)
    server = CoordServer("tcp://127.0.0.1:0", SyncConfig(**base), redis_url=redis_server.url).start()
    port = server.port  # the restart below comes back on the same one
    cfg = SyncConfig(**base, coord_backend="tcp", coord_endpoint=server.endpoint)
    src, target = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    try:
        with WeightPublisher(endpoint, config=cfg) as pub, \
                WeightReceiver(endpoint, model=target, config=cfg) as rx:
            pub.wait_for_receivers(1)
            assert [pub.publish(src).version for _ in range(2)] == [1, 2]
            server.close()  # the coordinator process goes away; its state stays in Redis
            server = CoordServer(f"tcp://127.0.0.1:{port}", cfg, redis_url=redis_server.url).start()
            with torch.no_grad():
                src.weight.mul_(2)
            assert pub.publish(src).version == 3
            assert rx.wait_for_version(3) == 3 and torch.equal(target.weight, src.weight)
            assert pub.status()["committed"] == 3
            deadline = time.monotonic() + 10  # the receiver's next heartbeat reports what it runs
            while [r["live_version"] for r in pub.status()["receivers"]] != [3]:
                assert time.monotonic() < deadline, pub.status()["receivers"]
                time.sleep(0.05)
    finally:
        server.close()
