"""Fleet update time across hosts: star over the network vs one gloo broadcast vs host relays.

    python bench/bench_fleet.py                        # 256 MiB, 1/2/4 hosts x 2 receivers, 500 Mbit/s
    python bench/bench_fleet.py --mb 64 --hosts 1,4 --modes star,relay
    python bench/bench_fleet.py --quick                # smoke-sized: checks that it works

Every host is a network namespace with its own stack on one bridge; every link is shaped with
``tc tbf`` in both directions (needs root). Host 0 runs ``hotweights publish``; each receiver host
runs ``--receivers`` ``hotweights receive`` processes and, in ``relay`` mode, a ``hotweights relay``:

- ``star``: every receiver follows the publisher over the network (``ucx``, one copy each), so
  the publisher's link carries hosts x receivers copies;
- ``gloo``: every receiver follows the publisher over ``torch`` (one gloo broadcast group per
  version's members);
- ``relay``: relays chained host to host (publisher -> host 1 -> host 2 -> ...), each republishing
  to its own receivers over shared memory: one copy per link, pipelined bucket by bucket.

The time is the publisher's ``publish()`` of one version: it returns only when every receiver on
every host has staged the version and the commit went out. Best of the versions after the first
(the first forms groups and faults in buffers). Bandwidth is 10^6 bytes/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PORT = 29600


def run_one(mode: str, hosts: int, receivers: int, mb: float, rate: str, versions: int, bucket_mb: int,
            timeout_s: float) -> list[float]:
    from hotweights_trainer.relay.netns import Netns, child_env, start_fleet

    transport = {"star": "ucx", "gloo": "torch", "relay": "auto"}[mode]
    topology = "chain" if mode == "relay" else "star"
    with Netns(hosts + 1, rate=rate) as net:
        env = child_env(HOTWEIGHTS_BUCKET_MB=str(bucket_mb))
        start_fleet(net, receivers=receivers, topology=topology, port=PORT, transport=transport,
                    timeout_s=timeout_s, bucket_mb=bucket_mb, env=env)
        members = 1 if mode == "relay" else hosts * receivers
        pub = net.spawn(0, [sys.executable, "-m", "hotweights_trainer", "publish", "--endpoint",
                            f"tcp://{net.ip(0)}:{PORT}", "--transport", transport, "--json",
                            "--size-mb", str(mb),
                            "--versions", str(versions), "--receivers", str(members), "--bucket-mb",
                            str(bucket_mb), "--timeout", str(timeout_s)], env=env)
        times = []
        for v in range(1, versions + 1):
            row = pub.wait_for({"role": "publisher", "version": v}, timeout_s * 4 + 120)
            if row["receivers"] != members:
                raise RuntimeError(f"{mode} x{hosts}: version {v} reached {row['receivers']} of {members}")
            times.append(row["seconds"])
        return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=256.0, help="payload per version (MB, default 256)")
    p.add_argument("--hosts", default="1,2,4", help="receiver host counts (comma list)")
    p.add_argument("--receivers", type=int, default=2, help="receivers per host")
    p.add_argument("--modes", default="star,gloo,relay")
    p.add_argument("--rate", default="500mbit", help="tbf rate of every link, each direction")
    p.add_argument("--versions", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=4)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--quick", action="store_true", help="smoke-sized run (8 MB, 1 and 2 hosts, 2 versions)")
    args = p.parse_args()
    if args.quick:
        args.mb, args.hosts, args.versions, args.modes = 8.0, "1,2", 2, "star,relay"

    from hotweights_trainer.relay.netns import available

    ok, why = available()
    if not ok:
        print(f"bench_fleet: skipped: network namespaces unavailable here ({why})")
        return 0
    host_counts = [int(h) for h in args.hosts.split(",")]
    rate = args.rate.lower()
    rate_mbps = float(rate.removesuffix("mbit")) / 8 if rate.endswith("mbit") else None
    rows = []
    for mode in args.modes.split(","):
        base = None
        for hosts in host_counts:
            times = run_one(mode, hosts, args.receivers, args.mb, args.rate, args.versions, args.bucket_mb,
                            args.timeout)
            best = min(times[1:] or times)
            base = base if base is not None else best
            rows.append((mode, hosts, best, best / base))
            print(f"... {mode} x{hosts}: {', '.join(f'{t:.2f}' for t in times)} s", file=sys.stderr,
                  flush=True)
    ideal = args.mb / rate_mbps if rate_mbps else float("nan")
    print()
    print(f"payload {args.mb:.0f} MB, {args.receivers} receivers per host, links {args.rate} each way "
          f"(one copy over one link: {ideal:.2f} s), bucket {args.bucket_mb} MiB")
    print()
    print("| mode | hosts | receivers | seconds | vs 1st host count | copies on publisher link "
          "| MB/s delivered |")
    print("|---|---|---|---|---|---|---|")
    for mode, hosts, best, ratio in rows:
        # gloo's broadcast algorithm decides how many copies leave the publisher: at most one per receiver.
        copies = {"relay": "1", "star": str(hosts * args.receivers)}.get(mode, f"<= {hosts * args.receivers}")
        delivered = args.mb * hosts * args.receivers / best
        print(f"| {mode} | {hosts} | {hosts * args.receivers} | {best:.2f} | {ratio:.2f}x | {copies} | "
              f"{delivered:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
