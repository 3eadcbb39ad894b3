"""Fleets across hosts through host relays, on real network namespaces with shaped links.

Each host is its own network namespace (own stack) on a bridge, every link shaped with tbf; a
publisher on host 0, a relay and receivers on each other host, relays chained host to host. Real
processes everywhere (``hotweights relay``, ``hotweights receive``, a publisher driven over stdin).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import pytest

from hotweights_trainer.relay.netns import Netns, NetnsError, child_env, start_fleet
from tests.conftest import ROOT, require
from tests.procs import warm
from tests.procs.warm import popen

PORT = 29500
MB = 24.0
RATE = "200mbit"  # 24 MB take >= 0.96 s on the first link: a fault 0.3 s in is surely mid-version
TIMEOUT_S = 8.0
pytestmark = pytest.mark.slow  # a dozen processes on four network namespaces per test


@pytest.fixture
def fleet_env():
    require("netns")
    return child_env(PYTHONPATH=str(ROOT))


def _driver(net: Netns, env: dict) -> object:
    proc = net.spawn(0, [sys.executable, str(ROOT / "tests" / "fleet" / "publisher_driver.py"), "--endpoint",
                         f"tcp://{net.ip(0)}:{PORT}", "--mb", str(MB), "--timeout", str(TIMEOUT_S)],
                     env=env, stdin=subprocess.PIPE)
    proc.wait_for({"event": "ready"}, 60)
    return proc


@contextlib.contextmanager
def _logs_on_failure(*groups):
    """On a failure, print the last log lines of these processes (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        for proc in [p for g in groups for p in g]:
            print(f"--- pid {proc.pid} host {proc.host} (exit status {proc.popen.poll()}): "
                  f"{' '.join(proc.popen.args[4:8])}\n"
                  + "".join(proc.stderr[-40:]))
        raise


def _cmd(proc, line: str) -> None:
    proc.popen.stdin.write(line + "\n")
    proc.popen.stdin.flush()


def _publish(proc, seed: int, timeout: float = 60) -> dict:
    _cmd(proc, f"publish {seed}")
    return _result(proc, seed, timeout)


def _result(proc, seed: int, timeout: float) -> dict:
    """The outcome line of ``publish SEED``: ``published`` or ``failed``."""
    deadline = time.monotonic() + timeout
    while True:
        for row in proc.matching({"seed": seed}):
            if row["event"] in ("published", "failed"):
                return row
        if time.monotonic() > deadline:
            raise AssertionError(f"no outcome of publish {seed} within {timeout:.0f}s")
        time.sleep(0.05)


def _start_publish(proc, seed: int) -> None:
    """Send ``publish SEED`` and return once the publisher is about to send (weights generated)."""
    _cmd(proc, f"publish {seed}")
    proc.wait_for({"seed": seed, "event": "publishing"}, 60)
    time.sleep(0.3)


def _applied(rxs, version: int, digest: str, timeout: float = 30) -> None:
    """Every receiver on every host applied ``version`` with exactly the publisher's bytes."""
    for host in rxs:
        for rx in host:
            row = rx.wait_for({"role": "receiver", "version": version}, timeout)
            assert row["digest"] == digest, f"host {rx.host} pid {rx.pid}: digest {row['digest']} != {digest}"


def test_chain_every_receiver_bit_exact_and_status_shows_the_tree(fleet_env):
    with Netns(4, rate=RATE, popen=popen) as net:  # publisher host + 3 receiver hosts x 2 receivers
        relays, rxs = start_fleet(net, receivers=2, topology="chain", port=PORT, timeout_s=TIMEOUT_S,
                                  env=fleet_env, verbose=True)
        pub = _driver(net, fleet_env)
        _cmd(pub, "wait 1")
        pub.wait_for({"event": "waited"}, 60)
        for seed in (1, 2, 3):
            row = _publish(pub, seed)
            assert row["event"] == "published", row
            _applied(rxs, row["version"], row["digest"])
        # Every host has its two receivers behind its relay, and each relay passed every version on.
        for proc in relays:  # its line comes from a poll loop: it may follow the receivers' by a moment
            proc.wait_for({"event": "version", "version": row["version"]}, 30)
        # Reports travel up the chain one heartbeat per hop (about 1 s each): poll, with a deadline.
        deadline = time.monotonic() + 30
        while True:
            out = warm.run(["ip", "netns", "exec", net.ns(0), sys.executable, "-m", "hotweights_trainer",
                            "status", f"tcp://{net.ip(0)}:{PORT}", "--json"],
                           capture_output=True, text=True, timeout=60, env=fleet_env)
            assert out.returncode == 0, out.stderr
            hosts = _tree_hosts(json.loads(out.stdout))
            settled = len(hosts) == 3 and all(
                h["version"] == row["version"] and len(h["receivers"]) == 2
                and all(r["live_version"] == row["version"] for r in h["receivers"]) for h in hosts)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert len(hosts) == 3 and all(h["version"] == row["version"] for h in hosts), hosts
        assert all(len(h["receivers"]) == 2 for h in hosts), hosts
        assert all(r["live_version"] == row["version"] for h in hosts for r in h["receivers"]), hosts
        text = warm.run(["ip", "netns", "exec", net.ns(0), sys.executable, "-m", "hotweights_trainer",
                         "status", f"tcp://{net.ip(0)}:{PORT}"], capture_output=True, text=True,
                        timeout=60, env=fleet_env)
        assert "relay tree" in text.stdout and text.stdout.count("lag 0") >= 3, text.stdout


def _tree_hosts(status: dict) -> list[dict]:
    """Flatten the relay reports: one dict per relay host with its local receivers."""
    out = []

    def walk(relays: dict) -> None:
        for info in relays.values():
            local = [r for f in info["fleets"] if f["endpoint"].startswith("shm://") for r in f["receivers"]]
            out.append({"host": info["host"], "version": info["version"], "receivers": local})
            for f in info["fleets"]:
                walk(f.get("relays", {}))

    walk(status.get("relays", {}))
    return out


@contextlib.contextmanager
def _chain_with_one_version(env: dict, fallback: bool = False):
    """Publisher host + 3 relay hosts x 1 receiver, chained, with version 1 applied everywhere;
    the relays' logs are printed if the test fails. One receiver per host: the fan-out to several
    receivers on a host is the chain test's; these tests are about what crosses hosts."""
    with Netns(4, rate=RATE, popen=popen) as net:
        relays, rxs = start_fleet(net, receivers=1, topology="chain", port=PORT, timeout_s=TIMEOUT_S,
                                  env=env, verbose=True, fallback=fallback)
        pub = _driver(net, env)
        with _logs_on_failure(relays, [pub]):
            _cmd(pub, "wait 1")
            pub.wait_for({"event": "waited"}, 60)
            first = _publish(pub, 1)
            assert first["event"] == "published", first
            _applied(rxs, first["version"], first["digest"])
            yield net, relays, rxs, pub, first


def test_relay_killed_mid_version_aborts_everywhere_then_next_version_succeeds(fleet_env):
    with _chain_with_one_version(fleet_env) as (net, relays, rxs, pub, first):
        _start_publish(pub, 2)  # the version is on the wire between hosts
        victim = relays[1]  # the middle of the chain: host 3 is behind it
        assert victim.poll() is None
        net.stop(victim, sig=9)
        failed = _result(pub, 2, 4 * TIMEOUT_S)
        assert failed["event"] == "failed", f"version went through although a relay died: {failed}"
        assert failed["seconds"] < 3 * TIMEOUT_S
        time.sleep(1.0)
        for host in rxs:
            for rx in host:  # nobody, on any host, applied any part of the aborted version
                assert {r["digest"] for r in rx.matching({"role": "receiver"})} == {first["digest"]}, rx.rows

        # The relay comes back; the next version reaches every receiver on every host.
        argv = list(victim.popen.args[4:])
        relays[1] = net.spawn(victim.host, argv, env=fleet_env)
        relays[1].wait_for({"event": "ready"}, 60)
        deadline = time.monotonic() + 30
        for seed in range(3, 100):
            row = _publish(pub, seed)
            if row["event"] == "published" or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # the restarted relay may still be joining; a refused version is retried
        assert row["event"] == "published", row
        _applied(rxs, row["version"], row["digest"])


def test_dead_relay_is_routed_around_by_the_hosts_behind_it(fleet_env):
    with _chain_with_one_version(fleet_env, fallback=True) as (net, relays, rxs, pub, first):
        net.stop(relays[1], sig=9)  # host 2's relay dies for good; host 3's relay also knows host 1's
        relays[2].wait_for({"event": "upstream", "upstream": f"tcp://{net.ip(1)}:{PORT}"}, 30)
        deadline = time.monotonic() + 60
        for seed in range(2, 100):
            row = _publish(pub, seed)
            if row["event"] == "published":
                try:  # hosts 1 and 3 get it; host 2's receivers have no relay and keep version 1
                    _applied([rxs[0], rxs[2]], row["version"], row["digest"], timeout=15)
                    break
                except NetnsError:  # not there yet: publish again until the deadline
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                pytest.fail(f"no version reached hosts 1 and 3 after the reroute: {row}")
            time.sleep(1.0)
        for rx in rxs[1]:
            assert {r["digest"] for r in rx.matching({"role": "receiver"})} == {first["digest"]}


def test_link_down_mid_version_aborts_within_deadline_and_host_catches_up(fleet_env):
    with _chain_with_one_version(fleet_env) as (net, relays, rxs, pub, first):
        _start_publish(pub, 2)
        net.link(3, up=False)  # the last host of the chain loses its cable mid-version
        t0 = time.monotonic()
        failed = _result(pub, 2, 6 * TIMEOUT_S)
        assert failed["event"] == "failed", failed
        assert time.monotonic() - t0 < 3 * TIMEOUT_S + 5, "the abort did not come within the deadlines"
        for host in rxs:
            for rx in host:
                assert {r["digest"] for r in rx.matching({"role": "receiver"})} == {first["digest"]}, rx.rows

        net.link(3, up=True)
        deadline = time.monotonic() + 60
        # Host 3 reconnects and catches up; until then its relay is not in the quorum.
        for seed in range(3, 100):
            row = _publish(pub, seed)
            if row["event"] == "published":
                try:
                    _applied(rxs, row["version"], row["digest"], timeout=15)
                    break
                except NetnsError:  # host 3 not back yet: publish again until the deadline
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                pytest.fail(f"no version reached every host after the link came back: {row}")
            time.sleep(1.0)
