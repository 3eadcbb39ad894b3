"""Recipe: an asynchronous RL loop. The policy trains with a GRPO-style objective in this process;
rollouts come from a generator in another process that follows the trainer's weights through a
``WeightReceiver``. Weights are pushed after every optimizer step.

Launch (CPU, about a minute on two cores)::

    python recipes/grpo_loop.py                      # async: generation overlaps training, pushes too
    python recipes/grpo_loop.py --push sync          # each step waits for its push to be committed
    python recipes/grpo_loop.py --max-staleness 0    # on-policy: every batch from the newest weights
    python recipes/grpo_loop.py --no-push            # baseline: weights frozen on the generator

The task: after a one-token prompt, emit the pattern ``3 1 4 1 5 9 2 6``. The reward of a
completion is the fraction of positions that match, computed by a Python function. A random tiny
Llama scores about 1/15; the loop must raise it well above that.

The objective, in plain code (``grpo_loss``): for each prompt the generator samples a group of
completions; each completion's advantage is its reward normalised within its group (minus the
group mean, over the group standard deviation), so no value network is needed. Rollouts can be up
to ``--max-staleness`` versions older than the weights being trained, so each token's log-probability
ratio new/behaviour (the generator reports the behaviour log-probabilities of the version that
sampled) is clipped as in PPO. There is no KL term.

The pipeline: version 1 is the initial weights; training step k uses batch k and version k and then
publishes version k+1, by default from a background thread (``AsyncPublisher``: the weights are
snapshotted at the step boundary and pushed while step k+1 trains; ``--push sync`` waits instead). The generator makes batch k only once version ``k - max_staleness`` is live,
so batch k+1 is generated while step k trains, and no batch is ever more than ``max_staleness``
versions stale. Every rollout carries the version that produced it and that version's weight
fingerprint; the trainer checks the fingerprint against the one it published. The generator waits
for the end of training, applies the final version and reports its fingerprint: the exit status is
non-zero on any mismatch.

The generator is pluggable (``--generator``, see ``rl_generators.py``): a vLLM engine fed by the
hotweights vLLM backend where vLLM is installed, else transformers' ``generate`` (said at start). Rollouts travel from the
generator to the trainer as JSON lines on the generator's stdout; ``--out FILE`` writes the per-step
metrics (reward, staleness, sync and pause milliseconds) as JSON for plotting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PATTERN = [3, 1, 4, 1, 5, 9, 2, 6]
VOCAB = 16
END = VOCAB - 1  # the end token: generation is forced past it, and the trainer masks it the same way
# A tiny Llama: vLLM's CPU attention needs heads of at least 32, and vLLM 0.32 reloads a GPT-2 in
# place wrongly (its own reload from disk gives other outputs than a fresh load), a Llama correctly.
MODEL_CONFIG = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=END,
                    eos_token_id=END, pad_token_id=END, tie_word_embeddings=False)
log = logging.getLogger("grpo_loop")


def reward(completion: list[int]) -> float:
    """Fraction of positions where the completion follows PATTERN."""
    return sum(int(a == b) for a, b in zip(completion, PATTERN)) / len(PATTERN)


def build_policy(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))


def make_prompts(batch: int, n_prompts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + batch)
    return torch.randint(0, END, (n_prompts, 1), generator=g)


# ---------------------------------------------------------------- trainer side
def grpo_loss(model: torch.nn.Module, prompts: torch.Tensor, completions: torch.Tensor, old_logps: torch.Tensor,
              rewards: torch.Tensor, group: int, clip: float = 0.2) -> torch.Tensor:
    r = rewards.view(-1, group)
    adv = ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).view(-1, 1)
    ids = torch.cat([prompts.repeat_interleave(group, dim=0), completions], dim=1)
    logits = model(input_ids=ids).logits[:, prompts.shape[1] - 1:-1].float()
    logits[..., END] = float("-inf")  # as in generation: the end token is never sampled
    logps = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


class Rollouts:
    """Reads the generator's JSON lines on a thread; ``get`` waits with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self._q: queue.Queue = queue.Queue()
        self._proc = proc
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self._proc.stdout:
            if line.startswith("ROLLOUT "):
                self._q.put(json.loads(line[len("ROLLOUT "):]))
        self._q.put(None)

    def get(self, timeout: float) -> dict[str, Any]:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no rollout from the generator within {timeout:.0f}s") from None
        if item is None:
            raise RuntimeError(f"the generator exited early (status {self._proc.wait(10)})")
        return item


def run_trainer(args: argparse.Namespace) -> int:
    from hotweights_trainer import SyncConfig, WeightPublisher
    from hotweights_trainer.async_publisher import AsyncPublisher
    from hotweights_trainer.verify import weights_digest
    from rl_generators import GeneratorUnavailable, check_generator

    try:
        check_generator(args.generator)
    except GeneratorUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    endpoint = args.endpoint or f"shm://grpo-{os.getpid()}"
    # The generator is one process starting now: wait for it before the first version. fp32 weights at
    # this learning rate change in every element at every step, so delta encoding would only cost time.
    cfg = SyncConfig.from_env(min_receivers=1, delta=args.delta)
    gen_cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "generator", "--endpoint", endpoint,
               *_shared_flags(args)]
    proc = subprocess.Popen(gen_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rollouts = Rollouts(proc)
    model = build_policy(args.seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    digests: dict[int, dict[str, str]] = {}
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        with WeightPublisher(endpoint, config=cfg) as pub, AsyncPublisher(pub) as apub:
            _wait_for_generator(pub, proc, cfg.receiver_wait_s)
            pub.publish(model, step=0)  # version 1: the initial weights, once the generator is there
            digests[pub.version] = weights_digest(model)
            t_start = time.perf_counter()
            for k in range(1, args.steps + 1):
                t0 = time.perf_counter()
                batch = rollouts.get(cfg.timeout_s)
                t_got = time.perf_counter()
                staleness = k - batch["version"]  # step k trains version k (the weights after k-1 steps)
                if batch["batch"] != k:
                    problems.append(f"step {k}: got batch {batch['batch']}")
                if not 0 <= staleness <= args.max_staleness and not args.no_push:
                    problems.append(f"step {k}: staleness {staleness} outside [0, {args.max_staleness}]")
                if batch["digest"] is None:  # vLLM: the workers report the version they hold
                    if batch.get("live_version") != batch["version"]:
                        problems.append(f"step {k}: rollout labelled version {batch['version']} was made while "
                                        f"version {batch.get('live_version')} was live")
                elif batch["digest"] != digests.get(batch["version"]):
                    problems.append(f"step {k}: rollout version {batch['version']} does not carry its weights")
                prompts = torch.tensor(batch["prompts"])
                completions = torch.tensor(batch["completions"])
                rewards = torch.tensor([reward(c) for c in batch["completions"]])
                loss = grpo_loss(model, prompts, completions, torch.tensor(batch["logps"]), rewards, args.group)
                opt.zero_grad()
                loss.backward()
                opt.step()
                t_trained = time.perf_counter()
                sync_ms = 0.0
                if not args.no_push:
                    digests[k + 1] = weights_digest(model)  # version k+1: versions are numbered in push order
                    if args.push == "async":
                        apub.submit(model, step=k)  # snapshot now; the push runs while step k+1 trains
                    else:
                        sync_ms = pub.publish(model, step=k).seconds * 1e3
                rows.append({"step": k, "reward": rewards.mean().item(), "loss": loss.item(),
                             "version": batch["version"], "staleness": staleness, "sync_ms": sync_ms,
                             "blocked_ms": (time.perf_counter() - t_trained) * 1e3,
                             "pause_ms": batch["pause_ms"], "gen_wait_ms": batch["wait_ms"],
                             "gen_ms": batch["gen_ms"], "rollout_wait_ms": (t_got - t0) * 1e3,
                             "train_ms": (t_trained - t_got) * 1e3,
                             "step_ms": (time.perf_counter() - t0) * 1e3})
            apub.flush()
            wall = time.perf_counter() - t_start
            for result in apub.results:  # background pushes: their own duration, and the version check
                rows[result.step - 1]["sync_ms"] = result.seconds * 1e3
                if result.version != result.step + 1:
                    problems.append(f"step {result.step} was published as version {result.version}")
            proc.stdin.write(json.dumps({"final_version": pub.version}) + "\n")  # the generator may stop
            proc.stdin.flush()
            final = rollouts.get(cfg.timeout_s)
            if final.get("digest") is None and final.get("final") != pub.version:
                problems.append(f"generator ended on version {final.get('final')}, not {pub.version}")
            elif final.get("digest") is not None and final.get("digest") != digests[pub.version]:
                problems.append(f"generator's final weights differ from version {pub.version}")
            gen_stats = final.get("stats", {})
    finally:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        status = proc.wait(cfg.timeout_s)
    if status != 0:
        problems.append(f"generator exited with status {status}")
    return _report(args, rows, problems, wall, gen_stats)


def _wait_for_generator(pub: Any, proc: subprocess.Popen, limit: float) -> None:
    """Wait for the generator to connect, but stop at once if its process died while starting."""
    from hotweights_trainer import SyncTimeoutError

    deadline = time.monotonic() + limit
    while proc.poll() is None:
        try:
            pub.wait_for_receivers(1, timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            return
        except SyncTimeoutError:  # one slice passed: check the process, then go on waiting
            if time.monotonic() >= deadline:
                raise
    raise RuntimeError(f"the generator exited (status {proc.returncode}) before it connected")


def _report(args: argparse.Namespace, rows: list[dict[str, Any]], problems: list[str], wall: float,
            gen_stats: dict[str, float]) -> int:
    print(f"{'step':>4} {'reward':>7} {'version':>7} {'stale':>5} {'sync_ms':>8} {'pause_ms':>8} {'step_ms':>8}")
    for r in rows:
        print(f"{r['step']:>4} {r['reward']:>7.3f} {r['version']:>7} {r['staleness']:>5} {r['sync_ms']:>8.2f} "
              f"{r['pause_ms']:>8.2f} {r['step_ms']:>8.1f}")
    n = min(10, len(rows))
    first = sum(r["reward"] for r in rows[:n]) / max(n, 1)
    last = sum(r["reward"] for r in rows[-n:]) / max(n, 1)
    mode = "no push" if args.no_push else f"{args.push} push, staleness<={args.max_staleness}"
    summary = {"mode": mode, "generator_name": args.generator, "steps": len(rows),
               "first10_reward": first, "last10_reward": last,
               "max_staleness_seen": max((r["staleness"] for r in rows), default=0),
               "wall_s": wall, "step_ms_mean": wall * 1e3 / max(len(rows), 1),
               "generator": gen_stats, "problems": problems}
    print("summary: " + json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}))
    return 1 if problems else 0


# ---------------------------------------------------------------- generator side
def run_generator(args: argparse.Namespace) -> int:
    from hotweights_trainer import SyncConfig
    from rl_generators import make_generator

    cfg = SyncConfig.from_env(delta=args.delta)
    # Another seed than the trainer's: only a weight sync can make the two models equal.
    gen = make_generator(args.generator, build_policy(args.seed + 1), args.endpoint, cfg, masked_token=END)
    stats = {"wait_s": 0.0, "pause_s": 0.0, "generate_s": 0.0}
    t_start = time.perf_counter()
    try:
        for k in range(1, args.steps + 1):
            need = 1 if args.no_push else max(1, k - args.max_staleness)
            wait_s, pause_s = gen.sync(need)
            version = gen.version
            t0 = time.perf_counter()
            prompts = make_prompts(k, args.prompts, args.seed)
            completions, logps = gen.generate(prompts, args.group, len(PATTERN), seed=args.seed * 7919 + k)
            gen_s = time.perf_counter() - t0
            if gen.version != version:  # cannot happen: versions change only in sync()
                raise RuntimeError(f"batch {k}: the live version changed during generation")
            stats["wait_s"] += wait_s
            stats["pause_s"] += pause_s
            stats["generate_s"] += gen_s
            live = gen.live_version() if hasattr(gen, "live_version") else version
            _emit({"batch": k, "version": version, "live_version": live, "digest": gen.weights_digest(),
                   "prompts": prompts.tolist(),
                   "completions": completions.tolist(), "logps": logps.tolist(), "wait_ms": wait_s * 1e3,
                   "pause_ms": pause_s * 1e3, "gen_ms": gen_s * 1e3})
        stats["wall_s"] = time.perf_counter() - t_start
        # Keep following until training ends, then report the final weights' fingerprint.
        ready, _, _ = select.select([sys.stdin], [], [], cfg.timeout_s)
        if not ready:
            raise TimeoutError(f"the trainer did not finish within {cfg.timeout_s:.0f}s of the last batch")
        line = sys.stdin.readline()
        final_version = json.loads(line)["final_version"] if line.strip() else gen.version
        gen.sync(final_version)
        _emit({"final": gen.version, "digest": gen.weights_digest(), "stats": stats})
    finally:
        gen.close()
    return 0


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write("ROLLOUT " + json.dumps(record) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- command line
def _shared_flags(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps), "--group", str(args.group), "--prompts", str(args.prompts),
           "--max-staleness", str(args.max_staleness), "--seed", str(args.seed), "--generator", args.generator,
           "--push", args.push, "--delta", args.delta]
    return out + (["--no-push"] if args.no_push else [])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="asynchronous GRPO-style RL loop with a generator process")
    ap.add_argument("--role", choices=["trainer", "generator"], default="trainer", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help="shm://NAME (default: unique per run)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps (one rollout batch each)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (the GRPO group)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    ap.add_argument("--max-staleness", type=int, default=1,
                    help="how many versions a batch may lag the weights it trains (0: synchronous)")
    ap.add_argument("--push", choices=["async", "sync"], default="async",
                    help="async: push from a background thread while the next step trains (AsyncPublisher); "
                         "sync: the step waits for publish() to return")
    ap.add_argument("--no-push", action="store_true", help="baseline: the generator keeps the first version")
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--delta", choices=["off", "auto", "always"], default="off",
                    help="delta sync (HOTWEIGHTS_DELTA); off: every element changes at this learning rate in fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generator", default=None,
                    help="rollout generator: vllm (default where vLLM is installed) or hf (see rl_generators.py)")
    ap.add_argument("--out", default=None, help="write per-step metrics as JSON here")
    args = ap.parse_args(argv)
    if args.max_staleness < 0:
        ap.error("--max-staleness must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.generator is None:
        from rl_generators import default_generator

        args.generator = default_generator()
        if args.generator != "vllm" and args.role == "trainer":
            log.warning("vLLM is not installed: rollouts come from transformers' generate (--generator hf)")
    # Two processes share the cores: one thread each, or they fight and nothing overlaps.
    torch.set_num_threads(1)
    return run_generator(args) if args.role == "generator" else run_trainer(args)


if __name__ == "__main__":
    sys.exit(main())
