"""A receiver process for the transport conformance suite.

Follows ENDPOINT with --transport and prints one JSON line per applied version
({"version", "digests"}); a rejected version prints {"error", "message"} and the loop goes on.
--die-at V:I SIGKILLs this process when bucket I of version V arrives (a receiver killed mid-version).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from hotweights_trainer import HotweightsError, PeerLostError, SyncConfig, SyncTimeoutError, WeightReceiver
from hotweights_trainer.verify import weights_digest

from tests.procs.common import SpecModule, load_spec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--transport", required=True)
    ap.add_argument("--ucx-backend", default="auto")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--until", type=int, default=1, help="exit after applying this version")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--die-at", default=None)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    model = SpecModule(spec)
    cfg = SyncConfig(transport=args.transport, timeout_s=args.timeout, ucx_backend=args.ucx_backend)
    with WeightReceiver(args.endpoint, model=model, config=cfg) as rx:
        if args.die_at:
            die = tuple(int(x) for x in args.die_at.split(":"))
            deliver = rx.on_bucket

            def on_bucket(version, index, data):
                if (version, index) == die:
                    print(json.dumps({"dying": die}), flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                deliver(version, index, data)

            rx.on_bucket = on_bucket
        print(json.dumps({"ready": True}), flush=True)
        want = 1
        while rx.version < args.until:
            try:
                v = rx.wait_for_version(want)
            except HotweightsError as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc)[:500], "version": rx.version}),
                      flush=True)
                if isinstance(exc, (SyncTimeoutError, PeerLostError)):
                    return 3  # nothing more is coming
                continue  # a rejected version: the next one may be good
            print(json.dumps({"version": v, "digests": weights_digest(model)}), flush=True)
            want = v + 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
