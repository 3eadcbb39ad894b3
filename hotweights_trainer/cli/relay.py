"""``hotweights relay``: one network copy per host -- follow an upstream, republish to this host's receivers.

Receives every version once over the network from ``--upstream`` (the publisher, or another host's
relay) and republishes it, bucket by bucket as each one is verified, on ``--local shm://NAME`` for
the receivers on this host and, with ``--serve tcp://HOST:PORT``, for the next host's relay. The
version commits on this host only when the whole fleet commits it (see docs/SCALE.md). Prints one
line when ready and one per version passed on; runs until interrupted, or for ``--versions``.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relay", help="host relay: one network copy per host, republished to local receivers",
                       description=__doc__)
    p.add_argument("--upstream", required=True, action="append",
                   help="tcp://HOST:PORT of the publisher or the previous host's relay; repeat it to give "
                        "fallbacks, followed in order when the current one stays unreachable")
    p.add_argument("--local", required=True, action="append",
                   help="shm://NAME this host's receivers follow (unique per host; repeatable)")
    p.add_argument("--serve", action="append", default=[],
                   help="tcp://HOST:PORT the next host's relay follows (repeatable: a tree)")
    p.add_argument("--transport", choices=("auto", "torch", "ucx"), default=None,
                   help="network transport of --upstream/--serve (default: HOTWEIGHTS_TRANSPORT, else auto)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of every wait in seconds "
                   "(default: HOTWEIGHTS_TIMEOUT_S)")
    p.add_argument("--bucket-mb", type=int, default=None, help="bucket size (must match the publisher's "
                   "to keep the pipeline fine-grained; default HOTWEIGHTS_BUCKET_MB)")
    p.add_argument("--versions", type=int, default=0,
                   help="exit after passing on this many versions (0: run)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import SyncConfig
    from ..relay.node import HostRelay

    overrides = {"transport": args.transport, "timeout_s": args.timeout, "bucket_mb": args.bucket_mb}
    cfg = SyncConfig.from_env(**{k: v for k, v in overrides.items() if v is not None})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def emit(**row) -> None:
        if args.json:
            print(json.dumps({"role": "relay", **row}), flush=True)
        else:
            print("relay: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)

    with HostRelay(args.upstream, [*args.local, *args.serve], config=cfg) as relay:
        emit(event="ready", host=relay.host, upstream=relay.upstream, downstream=relay.downstream)
        seen = relay.version
        following = relay.upstream
        passed = 0
        while not stop.is_set() and (not args.versions or passed < args.versions):
            relay.poll()
            if relay.upstream != following:
                following = relay.upstream
                emit(event="upstream", upstream=following)
            v = relay.version
            if v != seen:
                seen = v
                passed += 1
                emit(event="version", version=v, t=round(time.time(), 3))
            stop.wait(0.05)
    return 0
