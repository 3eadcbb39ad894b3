"""A receiver process for tests: follow ENDPOINT, print one JSON line per applied version.

Each line: {"version", "step", "digests": {name: xxh3}, "apply_ms"}; errors print {"error": type, "message"}.
Stops after --versions versions (or on error, or after --timeout without a new version).
"""

from __future__ import annotations

import argparse
import json
import sys

from hotweights_trainer import HotweightsError, SyncConfig, WeightReceiver
from hotweights_trainer.verify import weights_digest

from tests.procs.common import SpecModule, load_spec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--versions", type=int, default=1)
    ap.add_argument("--min-version", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--mode", choices=["model", "apply"], default="model")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    store: dict = {}
    model = SpecModule(spec) if args.mode == "model" else None

    def apply(items):
        for name, t in items:
            store[name] = t.clone()

    cfg = SyncConfig(timeout_s=args.timeout)
    with WeightReceiver(args.endpoint, model=model, apply=apply if model is None else None, config=cfg) as rx:
        print(json.dumps({"ready": True}), flush=True)
        want = args.min_version
        for _ in range(args.versions):
            try:
                v = rx.wait_for_version(want)
            except HotweightsError as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc), "version": rx.version}),
                      flush=True)
                return 3
            digests = weights_digest(model if model is not None else store)
            print(json.dumps({"version": v, "step": rx.step, "digests": digests,
                              "apply_ms": rx.last_apply_seconds * 1e3}), flush=True)
            want = v + 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
