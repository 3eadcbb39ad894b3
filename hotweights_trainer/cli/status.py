"""``hotweights status``: the fleet behind an endpoint -- receivers, live versions, lag, last heartbeat."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._common import add_json_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="show a fleet: receivers, live versions, lag, last heartbeat",
        description="Show the fleet of ENDPOINT as its coordinator sees it. The coordinator is found from "
                    "HOTWEIGHTS_COORD_BACKEND (embedded: ask the publisher on this host; tcp: ask "
                    "HOTWEIGHTS_COORD_ENDPOINT; redis: read HOTWEIGHTS_REDIS_URL); the options below "
                    "override it.")
    p.add_argument("endpoint", help="the publisher endpoint (fleet), e.g. shm://policy")
    p.add_argument("--backend", choices=["embedded", "tcp", "redis"], default=None)
    p.add_argument("--coord", default=None,
                   help="coordinator address(es) tcp://HOST:PORT[,...] (backend tcp)")
    p.add_argument("--redis-url", default=None, help="Redis URL (backend redis)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    add_json_flag(p)
    p.set_defaults(func=run)


def fleet_status(endpoint: str, backend: str, *, coord: str | None, redis_url: str | None,
                 timeout: float) -> dict[str, Any]:
    from ..config import SyncConfig

    config = SyncConfig.from_env(timeout_s=timeout)
    if backend == "embedded":
        from ..control.status_socket import query_status

        return query_status(endpoint, timeout)
    if backend == "tcp":
        from ..control.client import CoordClient, parse_endpoints

        client = CoordClient(parse_endpoints(coord or config.coord_endpoint), token=config.coord_token,
                             timeout_s=timeout, max_message_bytes=config.max_message_bytes)
        try:
            return client.call(endpoint, "status", {})
        finally:
            client.close()
    from ..control.redis_store import read_state
    from ..control.state import FleetState
    from ..errors import CoordinatorError

    url = redis_url or config.redis_url
    stored = read_state(url, endpoint, timeout)
    if stored is None:
        raise CoordinatorError(f"Redis at {url} holds no state for fleet {endpoint}")
    meta, members, open_, handles, leader = stored
    state = FleetState(endpoint, quorum=config.quorum, heartbeat_ttl_s=config.heartbeat_ttl_s,
                       version_timeout_s=config.timeout_s, handle_ttl_s=config.handle_ttl)
    state.load(meta, members, open_, handles)
    return {**state.status(time.time()), "store": leader}


def run(args: argparse.Namespace) -> int:
    from ..config import SyncConfig

    backend = args.backend or SyncConfig.from_env().coord_backend
    status = fleet_status(args.endpoint, backend, coord=args.coord, redis_url=args.redis_url,
                          timeout=args.timeout)
    emit(status, args.json, render)
    return 0


def render(s: dict[str, Any]) -> str:
    lines = [f"fleet {s['fleet']}: committed version {s['committed']}"
             + (f" (step {s['committed_step']})" if s.get("committed_step") is not None else "")
             + f", next {s['next_version']}, epoch {s['epoch']}, quorum {s['quorum_policy']}"]
    store = s.get("store") or {}
    if store.get("store") == "redis":
        leader = store.get("leader") or {}
        lines.append(f"state in Redis, leader {leader.get('endpoint', leader) or 'none'} "
                     f"(fence {store.get('fence')})")
    pub = s.get("publisher")
    if pub:
        lines.append(f"publisher pid {pub['pid']} on {pub['endpoint']} via {pub['transport']}, "
                     f"coordinator {pub['coord_backend']}")
    o = s.get("open")
    if o:
        lines.append(f"open version {o['version']}: {o['ready']}/{o['live']} precommitted, {o['decision']}"
                     + (f" ({o['reason']})" if o.get("reason") else ""))
    rows = s.get("receivers", [])
    lines.append(f"{len(rows)} receiver(s)")
    if rows:
        lines.append(f"  {'receiver':<32} {'pid':>8} {'live':>6} {'lag':>4}  last heartbeat")
        for r in rows:
            lines.append(f"  {r['rid'][:32]:<32} {r['pid']:>8} {r['live_version']:>6} {r['lag']:>4}  "
                         f"{r['heartbeat_age_s']:.1f}s ago")
    relays = s.get("relays") or {}
    if relays:
        lines.append("relay tree (one network copy per host; lag against this fleet's committed version)")
        lines.extend(relay_tree(relays, s["committed"], "  "))
    c = s.get("counters", {})
    refused = (pub or {}).get("refused_requests", s.get("refused_requests", 0))
    lines.append(f"handles active {s.get('handles_active', 0)}; commits {c.get('commits', 0)}, "
                 f"quorum failures {c.get('quorum_failures', 0)}, evictions {c.get('evictions', 0)}, "
                 f"refused requests {refused}")
    for r in s.get("recent", [])[-5:]:
        lines.append(f"  v{r['version']}: {r['outcome']}" + (f" ({r['reason']})" if r.get("reason") else ""))
    return "\n".join(lines)


def relay_tree(relays: dict[str, Any], committed: int, indent: str) -> list[str]:
    """One line per relay host (its version and lag, its receivers' worst lag), then its subtree."""
    lines = []
    for rid in sorted(relays):
        info = relays[rid]
        version = info.get("version", 0)
        local = [r for f in info.get("fleets", []) for r in f.get("receivers", [])
                 if str(f.get("endpoint", "")).startswith("shm://")]
        worst = max((committed - r.get("live_version", 0) for r in local), default=0)
        where = ", ".join(str(f.get("endpoint")) for f in info.get("fleets", []))
        lines.append(f"{indent}host {info.get('host', '?')} ({where}): relay at version {version}, lag "
                     f"{max(committed - version, 0)}; {len(local)} local receiver(s), "
                     f"worst lag {max(worst, 0)}")
        for f in info.get("fleets", []):
            if f.get("error"):
                lines.append(f"{indent}  {f.get('endpoint')}: {f['error']}")
            lines.extend(relay_tree(f.get("relays") or {}, committed, indent + "  "))
    return lines
