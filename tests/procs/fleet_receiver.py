"""A receiver process configured from HOTWEIGHTS_* variables (coordinator tests): one JSON line per version.

Lines: {"ready": true}, then {"version", "digests"} per applied version, or {"error", "message"}.
Runs until --versions versions were applied, a timeout, a lost publisher or a refusal; a rejected
version is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys

from hotweights_trainer import HotweightsError, PeerLostError, SyncConfig, SyncTimeoutError, WeightReceiver
from hotweights_trainer.errors import AuthError
from hotweights_trainer.verify import weights_digest

from tests.procs.common import SpecModule, load_spec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--versions", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    model = SpecModule(load_spec(args.spec))
    cfg = SyncConfig.from_env(timeout_s=args.timeout)
    with WeightReceiver(args.endpoint, model=model, config=cfg) as rx:
        print(json.dumps({"ready": True, "receiver_id": rx.receiver_id}), flush=True)
        want, done = 1, 0
        while done < args.versions:
            try:
                v = rx.wait_for_version(want)
            except HotweightsError as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc), "version": rx.version}),
                      flush=True)
                if isinstance(exc, (SyncTimeoutError, PeerLostError, AuthError)):
                    return 3
                continue  # a rejected version: report it and follow the next one
            done += 1
            print(json.dumps({"version": v, "digests": weights_digest(model),
                              "applied": rx.versions_applied}), flush=True)
            want = v + 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
