"""A receiver process driven over stdin, for the metrics tests. Its config comes from the environment
(``HOTWEIGHTS_METRICS_PORT`` starts its exporter), so the tests exercise what users set.

Prints {"ready": true, "receiver_id"} once connected-and-waiting, then for each stdin line:
  ``apply N``  wait (bounded by --timeout) for version >= N and apply it; prints
               {"version", "apply_seconds"} or {"error": type, "message"};
  ``quit``     exit.
EOF on stdin (the test process went away) also exits.
"""

from __future__ import annotations

import argparse
import json
import sys

from hotweights_trainer import HotweightsError, SyncConfig, WeightReceiver

from tests.procs.common import SpecModule, load_spec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    model = SpecModule(load_spec(args.spec))
    with WeightReceiver(args.endpoint, model=model, config=SyncConfig.from_env(timeout_s=args.timeout)) as rx:
        print(json.dumps({"ready": True, "receiver_id": rx.receiver_id}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            try:
                v = rx.wait_for_version(int(cmd[1]))
            except HotweightsError as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
                continue
            print(json.dumps({"version": v, "apply_seconds": rx.last_apply_seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
