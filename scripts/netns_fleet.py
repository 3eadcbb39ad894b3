"""Run one multi-host fleet on this machine and print per-version times (needs root).

Hosts are network namespaces joined by a bridge, every link shaped with ``tc tbf``; a publisher in
one host, relays and receivers in the others (``hotweights_trainer.relay.netns`` builds them)::

    python scripts/netns_fleet.py --hosts 3 --receivers 2 --mb 64 --topology chain
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hotweights_trainer.relay.netns import Netns, available, child_env, start_fleet  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/netns_fleet.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=3, help="receiver hosts (the publisher gets one more)")
    p.add_argument("--receivers", type=int, default=2, help="receivers per host")
    p.add_argument("--mb", type=float, default=64.0, help="payload per version in MB")
    p.add_argument("--versions", type=int, default=3)
    p.add_argument("--rate", default="500mbit", help="tbf rate of every link, each direction")
    p.add_argument("--topology", choices=("chain", "tree", "star"), default="chain")
    p.add_argument("--transport", choices=("auto", "torch", "ucx"), default="auto")
    p.add_argument("--bucket-mb", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ok, why = available()
    if not ok:
        print(f"network namespaces unavailable here: {why}", file=sys.stderr)
        return 1
    with Netns(args.hosts + 1, rate=args.rate) as net:
        env = child_env()
        port = 29500
        relays, rxs = start_fleet(net, receivers=args.receivers, topology=args.topology, port=port,
                                  transport=args.transport, bucket_mb=args.bucket_mb, env=env)
        members = args.hosts * args.receivers if args.topology == "star" else (
            1 if args.topology == "chain" else args.hosts)
        pub = net.spawn(0, [sys.executable, "-m", "hotweights_trainer", "publish", "--endpoint",
                            f"tcp://{net.ip(0)}:{port}", "--transport", args.transport, "--json",
                            "--size-mb", str(args.mb), "--versions", str(args.versions), "--receivers",
                            str(members), "--bucket-mb", str(args.bucket_mb)], env=env)
        print(f"{'version':>7} {'receivers':>9} {'MB':>8} {'seconds':>8}")
        for v in range(1, args.versions + 1):
            row = pub.wait_for({"role": "publisher", "version": v}, 300)
            print(f"{v:>7} {row['receivers']:>9} {row['mb']:>8.1f} {row['seconds']:>8.3f}", flush=True)
        pub.wait(timeout=60)
        for host in rxs:
            for rx in host:
                rx.wait_for({"role": "receiver", "version": args.versions}, 60)
        print(f"all {args.hosts * args.receivers} receivers on {args.hosts} host(s) applied version "
              f"{args.versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
