"""Async RL loop benchmark: what pushing weights every step costs the loop of ``recipes/grpo_loop.py``.

Three runs of the same recipe (same model, task, batch sizes and seed), each a trainer process and a
generator process with one thread each:

* ``async``: batch k+1 is generated while step k trains (``--max-staleness 1``), and each step's push
  runs from a background thread while the next step trains (``--push async``, ``AsyncPublisher``);
* ``sync pushes``: the same loop, but each step waits until its push is committed (``--push sync``);
* ``no push``: the same loop with the generator keeping the first version (weights frozen there);
* ``on-policy``: for reference, ``--max-staleness 0 --push sync``: the generator waits for each
  step's weights before the next batch, so generation and training never overlap.

Step time is the trainer's wall time from version 1 to the last step, over the steps. The generator's
shares are of its own wall time: ``paused`` is applying versions (the serving pause), ``waiting`` is
blocked on the staleness bound. The modes run interleaved, ``--repeats`` times each, and the table
shows medians. Target: async within 1.1x of no push.

Run: ``python bench/bench_rl_loop.py [--steps 40] [--repeats 3]``; ``--quick`` for a smoke run.
Absolute numbers on shared machines are noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "grpo_loop.py")
MODES = {"async": ["--max-staleness", "1", "--push", "async"],
         "sync pushes": ["--max-staleness", "1", "--push", "sync"],
         "no push": ["--max-staleness", "1", "--no-push"],
         "on-policy": ["--max-staleness", "0", "--push", "sync"]}


def run(mode: str, steps: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, RECIPE, "--steps", str(steps), "--endpoint", f"shm://bench-rl-{uuid.uuid4().hex[:8]}",
           *MODES[mode]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("summary: "))
    return json.loads(line[len("summary: "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, one repeat")
    args = ap.parse_args()
    steps, repeats = (6, 1) if args.quick else (args.steps, args.repeats)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved, so machine noise spreads over every mode
            results[mode].append(run(mode, steps))
    base = statistics.median(r["step_ms_mean"] for r in results["no push"])
    print(f"GRPO-style loop, {steps} steps, median of {repeats} run(s) per mode\n")
    print("| mode | step ms | vs no push | generator paused | generator waiting | last-10 reward |")
    print("|---|---|---|---|---|---|")
    for mode, runs in results.items():
        step = statistics.median(r["step_ms_mean"] for r in runs)
        paused = statistics.median(r["generator"]["pause_s"] / r["generator"]["wall_s"] for r in runs)
        waiting = statistics.median(r["generator"]["wait_s"] / r["generator"]["wall_s"] for r in runs)
        reward = statistics.median(r["last10_reward"] for r in runs)
        print(f"| {mode} | {step:.1f} | {step / base:.2f}x | {paused:.2%} | {waiting:.1%} | {reward:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
