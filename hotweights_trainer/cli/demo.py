"""``hotweights demo``: train a tiny model with HF Trainer and follow it from an inference process."""

from __future__ import annotations

import argparse
import json
import sys

from ._common import add_json_flag

HEADER = f"{'step':>4} {'version':>7} {'MB sent':>8} {'sync ms':>8} {'apply ms':>9}  {'bit-exact':<9}  sample"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny LM with HF Trainer and push every step to an inference process",
                       description=__doc__)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps to train (default 10)")
    p.add_argument("--endpoint", default=None, help="endpoint to use (default: a fresh shm://demo-PID)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds for every wait")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.steps < 1:
        print("hotweights demo: --steps must be >= 1", file=sys.stderr)
        return 2
    if not args.json:
        print(f"training a tiny GPT-2 for {args.steps} steps; an inference process applies every version")
        print(HEADER, flush=True)

    def emit(row) -> None:
        if not args.json:
            mark = "yes" if row.bit_exact else "NO"
            print(f"{row.step:>4} {row.version:>7} {row.mb_sent:>8.2f} {row.sync_ms:>8.2f} {row.apply_ms:>9.3f}"
                  f"  {mark:<9}  {row.sample!r}", flush=True)

    summary = run_demo(steps=args.steps, endpoint=args.endpoint, timeout_s=args.timeout, emit=emit)
    rows = summary.rows
    mismatches = sum(not r.bit_exact for r in rows)
    if args.json:
        print(json.dumps({"ok": summary.ok, "seconds": summary.seconds, "error": summary.error,
                          "rows": [r.__dict__ for r in rows]}, indent=2))
    else:
        if summary.error:
            print(f"error: {summary.error}", file=sys.stderr)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        status = "OK" if summary.ok else "FAILED"
        print(f"demo {status}: {len(rows)} versions, {len(rows) - mismatches} bit-exact, {mismatches} mismatched; "
              f"mean sync {mean([r.sync_ms for r in rows]):.2f} ms, mean apply {mean([r.apply_ms for r in rows]):.3f} ms; "
              f"{summary.seconds:.1f} s total")
    return 0 if summary.ok else 1
