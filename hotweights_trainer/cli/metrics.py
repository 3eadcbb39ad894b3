"""``hotweights metrics``: print a snapshot of a running publisher's or receiver's metrics.

Metrics live in the process that syncs, so this reads that process's exporter (started by
``HOTWEIGHTS_METRICS_PORT``). Without --url or --port it uses HOTWEIGHTS_METRICS_HOST and
HOTWEIGHTS_METRICS_PORT from the environment. Exit status 1 when the exporter cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from ._common import add_json_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="print a snapshot of a process's hotweights_* metrics",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="exporter URL, e.g. http://127.0.0.1:9400/metrics")
    where.add_argument("--port", type=int, help="exporter port on --host (default: HOTWEIGHTS_METRICS_PORT)")
    p.add_argument("--host", default=None, help="exporter host (default: HOTWEIGHTS_METRICS_HOST, 127.0.0.1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds for the request (default: HOTWEIGHTS_TIMEOUT_S)")
    p.add_argument("--all", action="store_true", help="include metrics not named hotweights_*")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import metrics_client
    from ..config import SyncConfig

    cfg = SyncConfig.from_env()
    url = args.url
    if url is None:
        port = cfg.metrics_port if args.port is None else args.port
        if not port:
            print("hotweights metrics: no exporter to read: pass --url or --port, or set "
                  "HOTWEIGHTS_METRICS_PORT to the port the syncing process exports on", file=sys.stderr)
            return 2
        if not 0 < port <= 65535:
            print(f"hotweights metrics: --port must be 1..65535, got {port}", file=sys.stderr)
            return 2
        url = metrics_client.url_for(args.host or cfg.metrics_host, port)
    timeout = cfg.timeout_s if args.timeout is None else args.timeout
    if not timeout > 0:
        print(f"hotweights metrics: --timeout must be > 0, got {timeout}", file=sys.stderr)
        return 2
    families = metrics_client.scrape(url, timeout=timeout, max_bytes=cfg.max_message_bytes,
                                     prefix="" if args.all else metrics_client.PREFIX)

    def text(_: object) -> str:
        rows = metrics_client.summary_rows(families)
        if not rows:
            return f"{url}: no hotweights metrics yet (nothing synced in that process so far)"
        w0 = max(len(r[0]) for r in rows)
        w1 = max(max(len(r[1]) for r in rows), len("labels"))
        lines = [f"metrics from {url}", f"{'metric':<{w0}}  {'labels':<{w1}}  value"]
        lines += [f"{m:<{w0}}  {lab:<{w1}}  {val}" for m, lab, val in rows]
        return "\n".join(lines)

    emit({"url": url, "metrics": metrics_client.to_json(families)}, args.json, text)
    return 0
