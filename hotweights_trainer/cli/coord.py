"""``hotweights coord``: run a standalone coordinator (``serve``), or free what dead publishers left (``gc``)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading

from ._common import add_json_flag

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7788"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coord", help="control plane: run a coordinator or clean up after dead publishers",
                       description=__doc__)
    csub = p.add_subparsers(dest="coord_command", metavar="SUBCOMMAND")

    serve = csub.add_parser(
        "serve", help="serve a coordinator on tcp://HOST:PORT (publishers use HOTWEIGHTS_COORD_BACKEND=tcp)",
        description="Serve a standalone coordinator. Publishers point HOTWEIGHTS_COORD_ENDPOINT at it. With "
                    "--store redis, several servers share a Redis; each fleet is led by the one holding its "
                    "lease and the others take over when it dies. Every mutating request needs "
                    "HOTWEIGHTS_COORD_TOKEN when that is set; a non-loopback bind requires it.")
    serve.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                       help=f"address to listen on (default {DEFAULT_ENDPOINT})")
    serve.add_argument("--store", choices=["memory", "redis"], default=None,
                       help="where fleet state lives (default: redis when HOTWEIGHTS_COORD_BACKEND=redis, "
                            "else memory)")
    serve.add_argument("--redis-url", default=None, help="Redis URL (default HOTWEIGHTS_REDIS_URL)")
    serve.add_argument("--advertise", default=None,
                       help="address other coordinators and clients should use for this one "
                            "(default: --endpoint)")
    serve.set_defaults(func=run_serve)

    gc = csub.add_parser(
        "gc", help="free the shared memory of dead publishers (and, with --fleet, their expired handles)",
        description="Unlink every shared-memory block on this host whose owner process is gone (SIGKILL, "
                    "os._exit). With --fleet, first run one janitor pass over that fleet's state in Redis: "
                    "abort a version its publisher never decided, expire handles whose TTL passed and "
                    "whose owner is dead, and unlink the shared memory behind them.")
    gc.add_argument("--fleet", default=None,
                    help="also clean up this fleet's state in Redis (the publisher endpoint, e.g. shm://policy)")
    gc.add_argument("--redis-url", default=None, help="Redis URL (default HOTWEIGHTS_REDIS_URL)")
    add_json_flag(gc)
    gc.set_defaults(func=run_gc)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_serve(args: argparse.Namespace) -> int:
    from ..config import SyncConfig
    from ..control.server import CoordServer

    config = SyncConfig.from_env()
    store = args.store or ("redis" if config.coord_backend == "redis" else "memory")
    redis_url = (args.redis_url or config.redis_url) if store == "redis" else None
    server = CoordServer(args.endpoint, config, redis_url=redis_url, advertise=args.advertise).start()
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(json.dumps({"serving": server.endpoint, "advertise": server.advertise, "store": store}), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from ..transports.shm_blocks import reclaim_dead_blocks

    result = _gc_fleet(args) if args.fleet is not None else {}
    reclaimed = [name for name in reclaim_dead_blocks() if name not in result.get("removed", [])]
    result["removed"] = result.get("removed", []) + reclaimed
    if args.json:
        print(json.dumps(result, indent=2))
    elif "skipped" in result:
        print(f"{args.fleet}: skipped: {result['skipped']}; {len(result['removed'])} shared-memory block(s) "
              "of dead publishers removed")
    elif args.fleet is not None:
        print(f"{args.fleet}: {len(result['expired_handles'])} handle(s) expired, "
              f"{len(result['removed'])} shared-memory block(s) removed")
    else:
        print(f"{len(result['removed'])} shared-memory block(s) of dead publishers removed")
    return 0


def _gc_fleet(args: argparse.Namespace) -> dict:
    from ..config import SyncConfig
    from ..control.coordinator import Coordinator
    from ..control.janitor import HOST, free_handles, owner_is_dead
    from ..control.redis_store import RedisStore
    from ..errors import NotLeaderError

    config = SyncConfig.from_env()
    url = args.redis_url or config.redis_url
    store = RedisStore(args.fleet, url, lease_ms=config.coord_lease_ms, timeout_s=config.timeout_s,
                       holder={"endpoint": f"gc {HOST}", "host": HOST}, keep_alive=False)
    coord = Coordinator(args.fleet, config, store)
    try:
        try:
            expired = coord.op_janitor(owner_is_dead)
        except NotLeaderError as exc:
            return {"fleet": args.fleet, "skipped": f"a live coordinator leads it and cleans up itself ({exc})"}
        removed = free_handles(args.fleet, expired, config)
        return {"fleet": args.fleet, "expired_handles": [h.key for h in expired], "removed": removed}
    finally:
        coord.close()
