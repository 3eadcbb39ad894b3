"""``hotweights kv-check``: show and check the KV-head map for a head layout.

Without ``--map``/``--map-file`` it prints the map derived from the head counts: the permutation that
converts a cache with repeated KV heads from the other order into ``--order`` (the engine's). With
one it checks that the explicit map is a permutation whose length fits a cache of this model: KvH
(compact cache) or H (cache with repeated KV heads). Exit 0 when valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from ..errors import KVMigrationError
from ..kv.heads import ORDERS, HeadCounts, check_map_fits, derive_head_map, parse_head_map, read_head_map_file
from ._common import add_json_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv-check", help="derive or check a KV-head map for H query / KvH KV heads",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, required=True, metavar="H", help="query heads (num_attention_heads)")
    p.add_argument("--kv-heads", type=int, required=True, metavar="KvH", help="KV heads (num_key_value_heads)")
    p.add_argument("--order", choices=ORDERS, default="grouped",
                   help="the serving engine's head order (HOTWEIGHTS_KV_HEAD_ORDER; default grouped)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--map", dest="map_json", metavar="JSON", help="explicit map, e.g. '[1,0]'")
    src.add_argument("--map-file", metavar="F", help="file holding the explicit map as JSON")
    add_json_flag(p)
    p.set_defaults(func=run)


def check(heads: int, kv_heads: int, order: str, map_json: Optional[str] = None,
          map_file: Optional[str] = None) -> dict[str, Any]:
    """The report kv-check prints; ``valid`` False with ``error`` when the inputs do not fit."""
    out: dict[str, Any] = {"heads": heads, "kv_heads": kv_heads, "order": order,
                           "source": "explicit" if (map_json is not None or map_file is not None) else "derived",
                           "group_size": None, "map": None, "layout": None, "map_length": None,
                           "valid": False, "error": None}
    try:
        counts = HeadCounts(heads, kv_heads)
        out["group_size"] = counts.group_size
        if map_json is not None:
            head_map = parse_head_map(map_json, source="--map")
        elif map_file is not None:
            head_map = read_head_map_file(map_file)
        else:
            head_map = derive_head_map(counts, order)
        out["map"], out["map_length"] = head_map, len(head_map)
        out["layout"] = "expanded" if out["source"] == "derived" else check_map_fits(head_map, counts)
        if out["source"] == "derived" and counts.heads == counts.kv_heads:
            out["layout"] = "compact"  # MHA: one copy per head, nothing to reorder
        out["valid"] = True
    except KVMigrationError as exc:
        out["error"] = str(exc)
    return out


def _text(r: dict[str, Any]) -> str:
    group = r["group_size"] if r["group_size"] is not None else "-"
    lines = [f"heads (H): {r['heads']}   kv heads (KvH): {r['kv_heads']}   group size (G): {group}",
             f"engine order: {r['order']}"]
    if r["map"] is not None:
        if r["source"] == "derived":
            other = next(o for o in ORDERS if o != r["order"])
            lines.append(f"derived map ({other} -> {r['order']}, cache with repeated KV heads, length H):")
        else:
            lines.append(f"explicit map (length {r['map_length']}):")
        lines.append(f"  {r['map']}")
    if r["valid"]:
        what = {"compact": "compact cache (KvH heads stored)",
                "expanded": "cache with repeated KV heads (H heads stored)"}[r["layout"]]
        lines.append(f"valid permutation for a {what}")
        if r["source"] == "derived" and r["layout"] == "expanded":
            lines.append("compact cache (KvH heads stored): no remap needed, the order lives in the weights")
    else:
        lines.append(f"INVALID: {r['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = check(args.heads, args.kv_heads, args.order, args.map_json, args.map_file)
    emit(report, args.json, _text)
    if not report["valid"]:
        print(f"hotweights kv-check: error: {report['error']}", file=sys.stderr)
        return 1
    return 0
