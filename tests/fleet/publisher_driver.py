"""A publisher the fleet tests drive line by line over stdin, answering one JSON line per command.

Commands: ``wait N`` (until N receivers are connected), ``publish SEED`` (synthetic weights of
``--mb`` MB from SEED; a failed version is reported, not fatal), ``status``, ``quit``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hotweights_trainer import SyncConfig, WeightPublisher
from hotweights_trainer.cli.publish import synthetic_weights
from hotweights_trainer.errors import HotweightsError
from hotweights_trainer.verify import combined_digest, weights_digest


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--mb", type=float, default=16.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--bucket-mb", type=int, default=4)
    args = p.parse_args()
    cfg = SyncConfig.from_env(timeout_s=args.timeout, bucket_mb=args.bucket_mb)

    def say(**row) -> None:
        print(json.dumps(row), flush=True)

    with WeightPublisher(args.endpoint, config=cfg) as pub:
        say(event="ready")
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "quit":
                break
            if cmd == "wait":
                try:
                    say(event="waited", n=pub.wait_for_receivers(int(rest[0])))
                except HotweightsError as exc:
                    say(event="wait_failed", message=str(exc))
            elif cmd == "status":
                say(event="status", status=pub.status())
            elif cmd == "publish":
                seed = int(rest[0])
                weights = synthetic_weights(args.mb, seed)
                say(event="publishing", seed=seed)  # the fault tests time their fault from here
                t0 = time.monotonic()
                try:
                    res = pub.publish(weights, step=seed)
                except HotweightsError as exc:
                    say(event="failed", seed=seed, error=type(exc).__name__, message=str(exc)[:1000],
                        seconds=time.monotonic() - t0)
                    continue
                say(event="published", seed=seed, version=res.version, receivers=res.receivers,
                    seconds=res.seconds, digest=combined_digest(weights_digest(weights)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
