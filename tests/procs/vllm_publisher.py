"""A trainer-side process for the vLLM tests: publish version 1, then die in the middle of version 2.

Prints JSON lines: {"published": 1} once version 1 is committed, {"mid": 2} once version 2 has begun
and half of its tensors were handed to the publisher; then it blocks until it is killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from hotweights_trainer import SyncConfig, WeightPublisher


def say(**kw) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    sys.path.insert(0, "recipes")
    from tiny_llama import load_hf

    model = load_hf(args.model)
    pub = WeightPublisher(args.endpoint, config=SyncConfig.from_env(bucket_mb=1, timeout_s=30))
    pub.wait_for_receivers(1, timeout=60)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    say(published=pub.publish(model, step=1).version)
    items = list(model.state_dict().items())

    def half_then_block():
        for i, item in enumerate(items):
            if i == len(items) // 2:
                say(mid=2)
                time.sleep(600)
            yield item

    pub.publish(half_then_block(), step=2)


if __name__ == "__main__":
    main()
