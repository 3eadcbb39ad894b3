"""``hotweights opt-check``: preview what an optimizer-state policy does on resume.

    hotweights opt-check --updated N --unchanged M --policy attenuate --attenuation 0.5
    hotweights opt-check --checkpoint DIR [--weights FILE] [--json]

The first form prints the counts for N updated and M unchanged parameters; the second compares a
checkpoint's sidecar with the weights a resume would load (by default the checkpoint's own
model.safetensors) and prints the same counts plus the names that changed. Policy and attenuation
default to HOTWEIGHTS_OPT_POLICY and HOTWEIGHTS_OPT_ATTENUATION.
"""

from __future__ import annotations

import argparse
import sys

from ._common import add_json_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("opt-check",
                       help="preview an optimizer-state policy (preserve/reset/attenuate) on resume",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updated", type=int, help="number of parameters whose weights changed")
    p.add_argument("--unchanged", type=int, help="number of parameters whose weights did not change")
    p.add_argument("--checkpoint", help="checkpoint folder with a hotweights sidecar")
    p.add_argument("--weights", help="weights to compare (.safetensors file, shard index or folder); "
                                     "default: the checkpoint's own model file")
    p.add_argument("--policy", help="preserve, reset or attenuate (default: HOTWEIGHTS_OPT_POLICY)")
    p.add_argument("--attenuation", type=float,
                   help="moment factor for attenuate, in [0, 1] (default: HOTWEIGHTS_OPT_ATTENUATION)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import SyncConfig
    from ..optim import expected_counts, preview_checkpoint

    cfg = SyncConfig.from_env()
    policy = args.policy if args.policy is not None else cfg.opt_policy
    attenuation = args.attenuation if args.attenuation is not None else cfg.opt_attenuation
    if args.checkpoint is not None:
        if args.updated is not None or args.unchanged is not None:
            print("hotweights opt-check: give either --checkpoint or --updated/--unchanged, not both",
                  file=sys.stderr)
            return 2
        data = preview_checkpoint(args.checkpoint, weights=args.weights, policy=policy,
                                  attenuation=attenuation)
    else:
        if args.updated is None or args.unchanged is None or args.weights is not None:
            print("hotweights opt-check: give --updated N and --unchanged M, or --checkpoint DIR",
                  file=sys.stderr)
            return 2
        data = expected_counts(args.updated, args.unchanged, policy, attenuation)
    emit(data, args.json, _text)
    return 0


def _text(d: dict) -> str:
    policy = d["policy"] + (f" (attenuation {d['attenuation']:g})" if d["policy"] == "attenuate" else "")
    lines = []
    if "checkpoint" in d:
        lines.append(f"checkpoint: {d['checkpoint']} (step {d['step']}, version {d['version']})")
        lines.append(f"weights:    {d['weights']}")
    lines += [f"policy:     {policy}",
              f"parameters: {d['updated']} updated, {d['unchanged']} unchanged",
              "expected optimizer state after resume:",
              f"  preserved   {d['preserved']:>8}",
              f"  attenuated  {d['attenuated']:>8}",
              f"  reset       {d['reset']:>8}"]
    scale = d["effective_update_scale"]
    lines.append("first Adam update of an updated parameter: "
                 + ("fresh first step (no stale share)" if scale is None
                    else f"stale moments' share scaled by {scale:.4f}"))
    lines += [f"  - {line}" for line in d["explanation"]]
    if d.get("updated_names"):
        shown = d["updated_names"][:20]
        lines.append("updated: " + ", ".join(shown) + (" ..." if len(d["updated_names"]) > 20 else ""))
    if d.get("shape_changed"):
        lines.append("shape changed (always reset): " + ", ".join(d["shape_changed"]))
    if d.get("missing"):
        lines.append(f"in the sidecar but not in the weights ({len(d['missing'])}): "
                     + ", ".join(d["missing"][:20]))
    if d.get("untracked"):
        lines.append(f"in the weights but not in the sidecar, not counted ({len(d['untracked'])}): "
                     + ", ".join(d["untracked"][:20]))
    return "\n".join(lines)
