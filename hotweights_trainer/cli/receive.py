"""``hotweights receive``: an inference-side loop that follows a publisher and applies every version.

Each committed version is applied into an in-memory state dict (the shape of an inference engine's
``load_weights``), and one line per version reports its size, apply time and a digest of the bytes
now held, which must equal the publisher's. Under ``mpirun`` run it on ranks 1..N-1 with
``--endpoint mpi://``; rank 0 runs the publisher.
"""

from __future__ import annotations

import argparse
import json
import time

from ._transport_flags import add_transport_flags, config_from_args, mpi_rank


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receive", help="follow a publisher and apply every version (inference side)",
                       description=__doc__)
    add_transport_flags(p)
    p.add_argument("--versions", type=int, default=0, help="exit after this many versions (0: until the "
                   "publisher goes away or no version arrives within --timeout)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import HotweightsError, PeerLostError, SyncTimeoutError
    from ..receiver import WeightReceiver
    from ..verify import combined_digest, tensor_digest

    cfg = config_from_args(args)
    rank = mpi_rank()
    who = f"rank {rank}" if rank is not None else "receiver"
    store: dict = {}

    def apply(items) -> None:
        for name, t in items:
            held = store.get(name)
            if held is not None and held.shape == t.shape and held.dtype == t.dtype:
                held.copy_(t)
            else:
                store[name] = t.clone()

    def report(**row) -> None:
        if args.json:
            print(json.dumps({"role": "receiver", "rank": rank, **row}), flush=True)
        elif "error" in row:
            print(f"{who}: version {row['version']} rejected: {row['error']}: {row['message']}", flush=True)
        else:
            print(f"{who}: version {row['version']} applied: {row['mb']:.1f} MB in {row['apply_ms']:.2f} ms, "
                  f"digest {row['digest']}", flush=True)

    applied = 0
    with WeightReceiver(args.endpoint, apply=apply, config=cfg) as rx:
        while not args.versions or applied < args.versions:
            try:
                v = rx.wait_for_version(rx.version + 1)
            except (SyncTimeoutError, PeerLostError) as exc:
                if args.versions:
                    raise
                if not args.json:
                    print(f"{who}: stopping: {exc}", flush=True)
                break
            except HotweightsError as exc:  # a rejected version: report it and keep following
                report(version=rx.version + 1, error=type(exc).__name__, message=str(exc)[:300])
                continue
            applied += 1
            t0 = time.perf_counter()
            digest = combined_digest({n: tensor_digest(t) for n, t in store.items()})
            report(version=v, step=rx.step, mb=rx.last_apply_bytes / 1e6, apply_ms=rx.last_apply_seconds * 1e3,
                   digest=digest, digest_ms=(time.perf_counter() - t0) * 1e3)
    return 0
