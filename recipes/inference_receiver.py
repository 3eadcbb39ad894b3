"""The inference side of every recipe: follow the trainer's weights and check them at the end.

    python recipes/inference_receiver.py --endpoint shm://NAME --expect final.json

Holds its own copy of the recipes' model (initialised with another seed), applies every version the
trainer commits, and, once the trainer has written the fingerprint of its final weights to
``--expect``, checks that its weights are bit-exact with them. Exit status: 0 bit-exact, 1 mismatch,
2 no final version within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from _common import build_model, say

from hotweights_trainer import PeerLostError, SyncConfig, SyncTimeoutError, WeightReceiver
from hotweights_trainer.verify import combined_digest, diff_digests, weights_digest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--expect", required=True, type=Path, help="JSON file the trainer writes at the end")
    ap.add_argument("--timeout", type=float, default=300.0, help="overall deadline in seconds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="receiver %(levelname)s %(name)s: %(message)s")

    model = build_model(seed=1234).eval()
    deadline = time.monotonic() + args.timeout
    with WeightReceiver(args.endpoint, model=model, config=SyncConfig(timeout_s=min(args.timeout, 60))) as rx:
        while time.monotonic() < deadline:
            try:
                version = rx.wait_for_version(rx.version + 1, timeout=0.5)
                say(f"receiver: applied version {version} (trainer step {rx.step}, "
                      f"{rx.last_apply_seconds * 1e3:.2f} ms pause)")
            except (SyncTimeoutError, PeerLostError):
                pass  # nothing new yet, or the trainer already finished; look for the final fingerprint
            if not args.expect.exists():
                continue
            final = json.loads(args.expect.read_text())
            if rx.version < final["version"]:
                continue
            bad = diff_digests(final["digests"], weights_digest(model))
            if bad:
                say(f"receiver: MISMATCH with the trainer's final weights in {len(bad)} tensor(s): "
                      f"{', '.join(bad[:10])}")
                return 1
            say(f"receiver: bit-exact with the trainer's final weights (version {rx.version}, "
                  f"step {rx.step}, digest {combined_digest(final['digests'])})")
            return 0
    say(f"receiver: the trainer's final version did not arrive within {args.timeout:.0f}s "
          f"(live version {rx.version})")
    return 2


if __name__ == "__main__":
    sys.exit(main())
