"""A cuda_ipc receiver whose model lives on the GPU (for the gpu-marked tests).

Prints {"ready": true}, then per applied version {"version", "digests", "device", "apply_s"}; exits after
--until. --die-at V:I SIGKILLs it when bucket I of version V arrives.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from hotweights_trainer import SyncConfig, WeightReceiver
from hotweights_trainer.verify import weights_digest
from tests.procs.common import SpecModule, load_spec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--until", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--die-at", default=None)
    args = ap.parse_args()
    model = SpecModule(load_spec(args.spec)).to("cuda")
    cfg = SyncConfig(transport="cuda_ipc", timeout_s=args.timeout)
    with WeightReceiver(args.endpoint, model=model, config=cfg) as rx:
        if args.die_at:
            die = tuple(int(x) for x in args.die_at.split(":"))
            deliver = rx.on_bucket

            def on_bucket(version, index, data):
                if (version, index) == die:
                    os.kill(os.getpid(), signal.SIGKILL)
                deliver(version, index, data)

            rx.on_bucket = on_bucket
        print(json.dumps({"ready": True}), flush=True)
        while rx.version < args.until:
            v = rx.wait_for_version(rx.version + 1)
            devices = sorted({str(p.device) for p in model.parameters()})
            print(json.dumps({"version": v, "digests": weights_digest(model), "device": devices,
                              "apply_s": rx.last_apply_seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
