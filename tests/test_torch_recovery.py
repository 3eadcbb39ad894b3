"""Kill-and-continue, repeated: a receiver SIGKILLed mid-version never makes a later version fail (torch).

One publisher and one surviving receiver live through the whole test. Each round a fresh receiver
process (forked by tests/procs/victims.py, so it starts in milliseconds) joins, catches up, and
SIGKILLs itself in the middle of the next version's broadcast; the version after that must commit
to the survivor, bit-exact. Rounds repeat so that a failure that shows once in ten runs cannot hide.
"""

from __future__ import annotations

import signal
import time

from hotweights_trainer import PeerLostError, SyncConfig, WeightPublisher
from hotweights_trainer.verify import weights_digest
from tests.procs.common import make_tensors, mixed_spec
from tests.procs.spawn import Proc, write_spec

ROUNDS = 30
TIMEOUT = 15.0
SPEC = mixed_spec(n_small=12, big_elems=400_000)  # ~5.6 MB: 5 buckets of 1 MiB, so bucket 2 is mid-version


def _applied(proc: Proc, version: int) -> dict:
    while True:
        line = proc.next(timeout=TIMEOUT + 10)
        if "digests" in line and line["version"] >= version:
            assert line["version"] == version, line
            return line


def test_receiver_killed_mid_version_thirty_times():
    spec_path = write_spec(SPEC)
    cfg = SyncConfig(transport="torch", bucket_mb=1, timeout_s=TIMEOUT, bcast_prefetch=True, bcast_chunk_mb=1)
    survivor = victims = None
    with WeightPublisher("tcp://127.0.0.1:0", config=cfg) as pub:
        endpoint = str(pub.endpoint)
        try:
            survivor = Proc(["-m", "tests.procs.tx_receiver", "--endpoint", endpoint, "--transport", "torch",
                             "--spec", spec_path, "--until", str(10 ** 6), "--timeout", str(TIMEOUT)])
            victims = Proc(["-m", "tests.procs.victims", "--endpoint", endpoint, "--transport", "torch",
                            "--spec", spec_path, "--timeout", str(TIMEOUT)], stdin=True)
            assert survivor.next(TIMEOUT + 30)["ready"] and victims.next(TIMEOUT + 30)["ready"]
            pub.wait_for_receivers(1)
            version = pub.publish(make_tensors(SPEC, 1)).version
            outcomes = {"committed": 0, "aborted": 0}
            for r in range(ROUNDS):
                victims.send(f"{version + 1}:2")  # dies at bucket 2 of the next version
                pid = victims.next(TIMEOUT)["spawned"]
                pub.wait_for_receivers(2)
                try:  # the victim's version: aborted, or committed without it once it was evicted
                    res = pub.publish(make_tensors(SPEC, 1000 + r))
                    assert res.receivers == 1, f"round {r}: committed to {res.receivers} with a dead receiver"
                    outcomes["committed"] += 1
                except PeerLostError:
                    outcomes["aborted"] += 1
                version += 1
                gone = victims.next(TIMEOUT)
                assert gone == {"exited": pid, "signal": signal.SIGKILL}, \
                    f"round {r}: {gone}\n{victims.stderr()}"
                deadline = time.monotonic() + TIMEOUT
                while len(pub.receivers) > 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                after = make_tensors(SPEC, 2000 + r)
                res = pub.publish(after)
                version = res.version
                assert res.receivers == 1, f"round {r}"
                assert _applied(survivor, version)["digests"] == weights_digest(after), f"round {r}"
            assert sum(outcomes.values()) == ROUNDS
        finally:
            for p in (survivor, victims):
                if p is not None:
                    p.kill()
