"""``hotweights bench``: run the benchmark suite (bench/bench_*.py) and print each script's table.

Scripts run one after another, each in its own process with a deadline. Exit status 1 when a script
fails or runs past its deadline. ``--quick`` runs every script that supports it at smoke size (to
check the suite works; those numbers mean nothing). The suite lives in the source checkout.
"""

from __future__ import annotations

import argparse
import sys

from ._common import add_json_flag, emit, progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite and print its tables", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="directory with bench_*.py scripts (default: the checkout's bench/)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this benchmark (core or bench_core.py); repeatable")
    p.add_argument("--quick", action="store_true", help="smoke-sized runs: checks the scripts, not the machine")
    p.add_argument("--timeout", type=float, default=1800.0, help="deadline per script in seconds (default 1800)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import benchsuite

    if not args.timeout > 0:
        print(f"hotweights bench: --timeout must be > 0, got {args.timeout}", file=sys.stderr)
        return 2
    bench_dir = benchsuite.find_bench_dir(args.dir)
    scripts = benchsuite.discover(bench_dir, args.only)
    if not scripts:
        print(f"hotweights bench: no bench_*.py scripts in {bench_dir}", file=sys.stderr)
        return 2
    if args.list:
        emit({"dir": str(bench_dir), "benchmarks": [{"script": s.name, "quick": benchsuite.supports_quick(s)}
                                                     for s in scripts]},
             args.json, lambda d: "\n".join(f"{b['script']}{'' if b['quick'] else '  (no --quick)'}"
                                            for b in d["benchmarks"]))
        return 0

    def show(run: benchsuite.BenchRun) -> None:
        if args.json:
            return
        head = f"## {run.script}"
        if run.skipped:
            text = f"{head}: skipped ({run.skipped})"
        else:
            text = f"{head} ({run.seconds:.1f} s)\n{run.output.rstrip()}"
            if run.error:
                text += f"\nFAILED: {run.error}"
        _write(text + "\n")

    runs = benchsuite.run_suite(
        scripts, quick=args.quick, timeout_s=args.timeout, on_done=show,
        wrap=lambda it: progress(it, total=len(scripts), desc="benchmarks", enabled=None if not args.json else False))
    failed = [r for r in runs if not r.ok]
    summary = {"dir": str(bench_dir), "quick": args.quick, "ok": not failed, "runs": [r.to_dict() for r in runs]}
    emit(summary, args.json, lambda s: f"{len(runs) - len(failed)} of {len(runs)} benchmarks ok"
         + (f"; failed: {', '.join(r.script for r in failed)}" if failed else ""))
    return 1 if failed else 0


def _write(text: str) -> None:
    """Print without tearing a progress bar that may be drawn on the terminal."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        tqdm.write(text.rstrip("\n"))
    else:
        print(text, flush=True)
