"""``hotweights publish``: publish synthetic weights (a smoke test and load generator for any transport).

Builds a state dict of ``--size-mb`` MB (a few float32/bfloat16/float16 tensors, one larger than a
bucket), waits for ``--receivers`` receivers, then publishes ``--versions`` versions, changing every
tensor between versions. One line per version gives the receivers that committed it, MB, seconds,
GB/s and the digest every receiver must report. Under ``mpirun`` run it on rank 0 with
``--endpoint mpi://``. With ``tcp://HOST:0`` the publisher binds a free port, and the first line
says which (``{"role": "publisher", "endpoint": ...}`` with ``--json``): give that to the receivers.
"""

from __future__ import annotations

import argparse
import json

from ._transport_flags import add_transport_flags, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish synthetic weights to receivers (smoke test / load generator)",
                       description=__doc__)
    add_transport_flags(p)
    p.add_argument("--versions", type=int, default=3, help="versions to publish (default 3)")
    p.add_argument("--size-mb", type=float, default=64.0, help="size of the synthetic weights in MB (default 64)")
    p.add_argument("--receivers", type=int, default=1, help="receivers to wait for before the first version")
    p.add_argument("--bucket-mb", type=int, default=None, help="bucket size (default: HOTWEIGHTS_BUCKET_MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def synthetic_weights(size_mb: float, seed: int) -> dict:
    """A state dict of about ``size_mb`` MB in mixed float dtypes, deterministic in ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    total = int(size_mb * 1e6)
    plan = [("embed.weight", torch.float32, 0.5), ("layers.0.attn.weight", torch.bfloat16, 0.2),
            ("layers.0.mlp.weight", torch.float16, 0.2), ("layers.0.norm.weight", torch.float32, 0.1)]
    out = {}
    for name, dtype, share in plan:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        n = max(int(total * share) // itemsize, 1)
        out[name] = torch.randn(n, generator=g, dtype=torch.float32).to(dtype)
    return out


def run(args: argparse.Namespace) -> int:
    from ..publisher import WeightPublisher
    from ..verify import combined_digest, weights_digest

    if args.versions < 1 or args.size_mb <= 0 or args.receivers < 0:
        print("hotweights publish: --versions >= 1, --size-mb > 0 and --receivers >= 0 are required")
        return 2
    cfg = config_from_args(args, bucket_mb=args.bucket_mb)
    with WeightPublisher(args.endpoint, config=cfg) as pub:
        if str(pub.endpoint) != args.endpoint:  # port 0: receivers need the port that was bound
            print(json.dumps({"role": "publisher", "endpoint": str(pub.endpoint)}) if args.json else
                  f"publish: listening on {pub.endpoint}", flush=True)
        if args.receivers:
            pub.wait_for_receivers(args.receivers)
        for i in range(args.versions):
            weights = synthetic_weights(args.size_mb, args.seed + i)
            res = pub.publish(weights, step=i)
            row = {"role": "publisher", "version": res.version, "receivers": res.receivers,
                   "mb": res.bytes_sent / 1e6, "seconds": res.seconds, "gbps": res.gbps,
                   "digest": combined_digest(weights_digest(weights)), "transport": pub.transport.name}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"publish: version {res.version} to {res.receivers} receiver(s) over {row['transport']}: "
                      f"{row['mb']:.1f} MB in {res.seconds * 1e3:.1f} ms ({res.gbps:.2f} GB/s), "
                      f"digest {row['digest']}", flush=True)
    return 0
