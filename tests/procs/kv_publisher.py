"""A publisher process for KV tests: publish the tensors of a safetensors file once, then wait.

Prints {"version": N} once the receiver committed it, and stays up (so the receiver applies from
live buffers) until the receiver disconnects or the deadline passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hotweights_trainer import SyncConfig, WeightPublisher


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    from safetensors.torch import load_file

    tensors = load_file(args.weights)
    with WeightPublisher(args.endpoint, config=SyncConfig(timeout_s=args.timeout, bucket_mb=1)) as pub:
        pub.wait_for_receivers(1)
        res = pub.publish(tensors)
        print(json.dumps({"version": res.version}), flush=True)
        deadline = time.monotonic() + args.timeout
        while pub.receivers and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
