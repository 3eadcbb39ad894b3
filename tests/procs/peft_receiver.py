"""A receiver process holding a tiny Llama, plain or with LoRA: one JSON line per applied version.

Lines: {"ready", "digests"} first, then {"version", "step", "digests"} where digests holds the combined
digest of the adapter tensors, of everything else and of all (tests/procs/peft_models.py). Stops after
--versions versions or once a version of --until-step is applied; errors print {"error", "message"}.
"""

from __future__ import annotations

import argparse
import json
import sys

from hotweights_trainer import HotweightsError, SyncConfig, WeightReceiver

from tests.procs.peft_models import llama, split_digests, with_lora


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--kind", choices=["plain", "peft"], default="plain")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--llama", default="{}", help="LlamaConfig overrides as JSON")
    ap.add_argument("--lora", default="{}", help="LoraConfig overrides as JSON")
    ap.add_argument("--versions", type=int, default=0)
    ap.add_argument("--until-step", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    model = llama(args.seed, args.dtype, **json.loads(args.llama))
    if args.kind == "peft":
        model = with_lora(model, args.dtype, **json.loads(args.lora))
    with WeightReceiver(args.endpoint, model=model, config=SyncConfig(timeout_s=args.timeout)) as rx:
        print(json.dumps({"ready": True, "digests": split_digests(model)}), flush=True)
        seen = 0
        while True:
            try:
                v = rx.wait_for_version(rx.version + 1)
            except HotweightsError as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
                return 3
            seen += 1
            print(json.dumps({"version": v, "step": rx.step, "digests": split_digests(model)}), flush=True)
            if (args.versions and seen >= args.versions) or (args.until_step and (rx.step or 0) >= args.until_step):
                return 0


if __name__ == "__main__":
    sys.exit(main())
