"""ZeRO-3 push: bucketed gathers vs per-parameter gathers vs gather-everything, on two real ranks.

    python bench/bench_zero3.py                      # GPT-2 of ~120 MB fp32 (196 tensors), 2 CPU ranks
    python bench/bench_zero3.py --n-layer 24 --rounds 7

Starts ``torchrun --nproc_per_node 2`` on itself, twice (see "Two passes"). Both ranks train one step
of a GPT-2 built from a config under DeepSpeed ZeRO-3 (parameters really partitioned: persistence
threshold 0); rank 0 owns a ``WeightPublisher`` on ``shm://`` and starts one receiver process. Each
approach then pushes the same weights ``--rounds`` times (after one warm-up round; approaches
interleaved), timed on rank 0 from the first gather to the commit:

* ours: ``publish_source`` -- groups of one bucket, gathered collectively, packed before release;
* per-parameter: one ``GatheredParameters([p])`` per parameter, each sent as it comes (the loop of
  TRL and OpenRLHF, here through the same publisher, so the gathering is what differs);
* gather-everything: ``GatheredParameters(all)``, then publish the module.

Two passes, because what makes memory measurable distorts time. Peak extra memory is anonymous RSS
(``tests/procs/memprobe.py``) above its value before the push -- the highest reading of a 0.5 ms
sampler and of probes inside each gather, per rank -- with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed tensors leave RSS at once. That setting also makes every gather touch fresh pages (about 0.6
GB/s here), so times come from a second pass with the default allocator.

Sends are dense (``delta="off"``): every round pushes the same weights, which delta sync would
reduce to almost nothing. Physical floor, measured in the same run: one ``memcpy`` of the model's
bytes. Receiver weights are checked bit-exact after every approach.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package and its test instrumentation (tests/procs/memprobe.py)


def model_config(args: argparse.Namespace):
    from transformers import GPT2Config

    return GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=8, vocab_size=args.vocab,
                      n_positions=512, bos_token_id=0, eos_token_id=0)


def build(args: argparse.Namespace, seed: int):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(model_config(args))


# ------------------------------------------------------------------------------------------ receiver
def receiver(args: argparse.Namespace) -> int:
    from hotweights_trainer import HotweightsError, SyncConfig, WeightReceiver
    from hotweights_trainer.verify import combined_digest, weights_digest

    model = build(args, seed=99).eval()
    with WeightReceiver(args.endpoint, model=model, config=SyncConfig(timeout_s=120)) as rx:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = sys.stdin.readline()  # rank 0 asks "version N?" after each approach
            if not line.strip():
                return 0
            want = int(line)
            try:
                rx.wait_for_version(want, timeout=120)
            except HotweightsError as exc:
                print(json.dumps({"error": str(exc)}), flush=True)
                return 3
            print(json.dumps({"version": rx.version, "digest": combined_digest(weights_digest(model))}),
                  flush=True)


# ------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from hotweights_trainer import SyncConfig, WeightPublisher
    from hotweights_trainer.integrations import gather
    from hotweights_trainer.source import FLUSH
    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.memprobe import PeakMemory, watch_gathers

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = build(args, seed=0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(1 for _ in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "steps_per_print": 10**6,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=ds_config)
    ids = torch.randint(0, args.vocab, (1, 64))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    module = engine.module

    buckets = [int(x) for x in args.bucket_mb.split(",")]
    # Dense sends for every approach: the same weights are pushed each round, which delta sync would
    # reduce to nothing; what differs between the approaches is the gathering.
    cfg = SyncConfig(bucket_mb=max(buckets), timeout_s=120, delta="off")
    pub = rx = None
    if rank == 0:
        # One publisher for every approach; each sets the bucket size it runs with on pub.config.
        pub = WeightPublisher(args.endpoint, config=cfg)
        rx = subprocess.Popen([sys.executable, __file__, "--receiver", "--endpoint", args.endpoint,
                               "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd),
                               "--vocab", str(args.vocab)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(rx.stdout.readline())["ready"]
        pub.wait_for_receivers(1, timeout=120)

    def per_parameter():
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.detach()
                yield FLUSH

    def push_ours(bucket_mb: int):
        src = gather.publish_source(module, is_main=rank == 0, bucket_bytes=bucket_mb << 20)
        try:
            if src is not None:
                pub.config = cfg.replace(bucket_mb=bucket_mb)
                pub.publish(src)
        finally:
            gather.finish(src)

    def push_per_parameter():
        if rank == 0:
            pub.config = cfg.replace(bucket_mb=max(buckets))
            pub.publish(per_parameter())
        else:
            for _ in per_parameter():
                pass

    def push_everything():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if probes:
                probes[-1].probe()
            if rank == 0:
                pub.config = cfg.replace(bucket_mb=max(buckets))
                pub.publish(module)

    approaches = {f"ours, bucketed gathers ({b} MiB buckets)": (lambda b=b: push_ours(b)) for b in buckets}
    approaches["per-parameter gather (TRL / OpenRLHF)"] = push_per_parameter
    approaches["gather everything, then publish"] = push_everything

    probes: list[PeakMemory] = []
    watch_gathers(lambda: probes[-1].probe() if probes else None)
    samples: dict[str, list[float]] = {k: [] for k in approaches}
    extra: dict[str, int] = {k: 0 for k in approaches}
    exact: dict[str, bool] = {}
    for round_ in range(args.rounds + 1):
        for name, push in approaches.items():
            dist.barrier()
            pm = PeakMemory()
            if args.measure_memory:
                probes.append(pm)
                with pm:
                    push()
                probes.clear()
                dt = 0.0
            else:  # no sampler thread competing for the GIL while timing
                t0 = time.perf_counter()
                push()
                dt = time.perf_counter() - t0
            if round_ == 0:
                continue  # warm-up: shared-memory blocks, allocator, gloo buffers
            samples[name].append(dt)
            extra[name] = max(extra[name], pm.extra_bytes)
            if rank == 0 and round_ == args.rounds:
                rx.stdin.write(f"{pub.version}\n")
                rx.stdin.flush()
                exact[name] = json.loads(rx.stdout.readline()).get("digest")

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        truth = combined_digest(weights_digest(module)) if rank == 0 else None
    memcpy_s = None
    if rank == 0:
        flat = torch.empty(model_bytes // 4)
        dst = torch.empty_like(flat)
        dst.copy_(flat)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(flat)
            times.append(time.perf_counter() - t0)
        memcpy_s = min(times)
        rx.stdin.close()
        rx.wait(60)
        pub.close()
    sys.stdout.write("RESULT " + json.dumps({
        "rank": rank, "model_bytes": model_bytes, "n_params": n_params, "largest_bytes": largest,
        "memcpy_s": memcpy_s,
        "seconds": samples, "extra": extra,
        "bit_exact": {k: v == truth for k, v in exact.items()} if rank == 0 else None}) + "\n")
    sys.stdout.flush()  # one write per record: both ranks share the launcher's stdout
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------ launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pass(args: argparse.Namespace, argv: list[str], **extra_env: str) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra_env,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                   os.pathsep) if p]))
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, "--worker", "--endpoint", f"shm://bench-z3-{uuid.uuid4().hex[:8]}",
           *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    decoder, rows, pos = json.JSONDecoder(), [], proc.stdout.find("RESULT {")
    while pos >= 0:  # records may be followed by the other rank's output on the same line
        record, end = decoder.raw_decode(proc.stdout, pos + len("RESULT "))
        rows.append(record)
        pos = proc.stdout.find("RESULT {", end)
    rows.sort(key=lambda r: r["rank"])
    if proc.returncode != 0 or len(rows) != 2:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-8000:])
        raise SystemExit(1)
    return rows


def launcher(args: argparse.Namespace, argv: list[str]) -> int:
    t0, _ = run_pass(args, argv)  # timing: default allocator
    m0, m1 = run_pass(args, [*argv, "--measure-memory"], MALLOC_MMAP_THRESHOLD_="65536")
    mb = t0["model_bytes"]
    ours_key = next(iter(t0["seconds"]))
    ours_ms = statistics.median(t0["seconds"][ours_key]) * 1e3
    print(f"ZeRO-3 push, 2 CPU ranks (gloo) + 1 receiver (shm://): GPT-2 with {t0['n_params']} parameter "
          f"tensors, {mb / 1e6:.1f} MB fp32, largest tensor {t0['largest_bytes'] / 2**20:.1f} MiB; "
          f"{args.rounds} rounds after 1 warm-up; ms = median (min) on rank 0")
    print()
    print("| approach | gather+publish ms | time vs ours | GB/s | peak extra MiB rank0 / rank1 | "
          "extra / model | bit-exact |")
    print("|---|---|---|---|---|---|---|")
    for name, secs in t0["seconds"].items():
        med, low = statistics.median(secs) * 1e3, min(secs) * 1e3
        e0, e1 = m0["extra"][name] / 2**20, m1["extra"][name] / 2**20
        exact = t0["bit_exact"].get(name) and m0["bit_exact"].get(name)
        print(f"| {name} | {med:.0f} ({low:.0f}) | {med / ours_ms:.2f}x | {mb / med / 1e6:.2f} | "
              f"{e0:.1f} / {e1:.1f} | {max(e0, e1) * 2**20 / mb:.2f} | {'yes' if exact else 'NO'} |")
    memcpy_ms = t0["memcpy_s"] * 1e3
    print(f"| physical floor: one memcpy of the model's bytes | {memcpy_ms:.1f} | "
          f"{memcpy_ms / ours_ms:.2f}x | "
          f"{mb / memcpy_ms / 1e6:.2f} | - | - | - |")
    ok = all(t0["bit_exact"].values()) and all(m0["bit_exact"].values())
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-layer", type=int, default=16)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bucket-mb", default="8,32",
                    help="bucket sizes in MiB for our approach (the first is the reference)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--quick", action="store_true", help="smoke-sized run: checks the script only")
    args, _ = ap.parse_known_args()
    if args.quick:  # passed on to the workers through argv, which parse it again
        args.n_layer, args.n_embd, args.rounds = 2, 64, 1
    if args.receiver:
        return receiver(args)
    if args.worker:
        return worker(args)
    argv = [a for a in sys.argv[1:] if a not in ("--worker", "--receiver", "--measure-memory")]
    return launcher(args, argv)


if __name__ == "__main__":
    sys.exit(main())
