"""cuda_ipc publish -> committed between two processes on one GPU, against a device copy_ of the same bytes.

    python bench/bench_cuda_ipc.py                      # 1 GiB and 8 GiB of bf16
    python bench/bench_cuda_ipc.py --sizes-gb 1 --reps 5 --bucket-mb 512
    python bench/bench_cuda_ipc.py --quick              # 256 MiB smoke run

In one run, per size:

- ``copy_``: ``dst.copy_(src)`` of one flat bf16 tensor of that size on the GPU (the physical
  reference: every byte read once and written once), best of ``--reps``;
- ``digest``: the device digest (hotweights_trainer/gpu/checksum.py) of the same bytes -- one read;
- ``cuda_ipc``: ``WeightPublisher.publish`` of a model of that size in bf16 (tensors of 64 MiB plus
  small ones) to a receiver process on the same GPU, measured from the call until it returned
  committed (pack into device buckets with digests, CUDA IPC, each receiver's device-to-device copy
  into its own staged buffer with its digest, the two-phase commit). Best and median of ``--reps``
  after one warm-up version (which allocates buffers and opens the IPC handles). The receiver applies
  each version (the device scatter into its model) before the next is published; ``apply ms`` is
  that pause, and the last version is checked bit for bit on the receiver.

The design copies every byte twice before commit (the publisher's pack, the receiver's copy into a
buffer of its own), so its bound is about 50% of one ``copy_``; ``vs copy_`` is the measured ratio.
Without a CUDA device it prints why and exits 0 (``--require-gpu``: exit 2), so the benchmark suite
stays usable on CPU machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
BIG = 64 * MIB


def _spec(total_bytes: int) -> list[tuple[str, list[int]]]:
    """bf16 tensors adding up to ``total_bytes``: 64 MiB matrices plus a few small norms."""
    spec = []
    small = [(f"layers.{i}.norm", [4096]) for i in range(8)]
    rest = total_bytes - sum(2 * s[1][0] for s in small)
    i = 0
    while rest >= BIG:
        spec.append((f"layers.{i}.w", [4096, BIG // 2 // 4096]))
        rest -= BIG
        i += 1
    if rest >= 2 * 4096:
        spec.append(("tail.w", [4096, rest // 2 // 4096]))
    return spec + small


def _model(spec, device: str) -> torch.nn.Module:
    m = torch.nn.Module()
    for name, shape in spec:
        m.register_buffer(name.replace(".", "_"), torch.zeros(shape, dtype=torch.bfloat16, device=device))
    return m


def _device_digests(tensors) -> list[int]:
    from hotweights_trainer.gpu.checksum import payload_digest

    return [payload_digest(t.reshape(-1).view(torch.uint8)) for t in tensors]


def receiver(args: argparse.Namespace) -> int:
    from hotweights_trainer import SyncConfig, WeightReceiver

    spec = json.loads(args.spec)
    model = _model(spec, "cuda")
    cfg = SyncConfig(transport="cuda_ipc", timeout_s=args.timeout, bucket_mb=args.bucket_mb)
    with WeightReceiver(args.endpoint, model=model, config=cfg) as rx:
        print(json.dumps({"ready": True}), flush=True)
        while rx.version < args.versions:
            v = rx.wait_for_version(rx.version + 1)
            line = {"version": v, "apply_s": rx.last_apply_seconds}
            if v == args.versions:
                line["digests"] = _device_digests(t for _, t in model.named_buffers())
            print(json.dumps(line), flush=True)
    return 0


def _timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _read(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.errors.seek(0)
            raise RuntimeError(f"receiver exited ({proc.wait(5)}): {proc.errors.read()[-3000:]}")
        if line.startswith("{"):
            return json.loads(line)
    raise TimeoutError("receiver said nothing in time")


def measure(size: int, args: argparse.Namespace) -> dict:
    from hotweights_trainer import SyncConfig, WeightPublisher
    from hotweights_trainer.gpu.checksum import payload_digest

    n = size // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), args.reps)
    digest_s = _timed(lambda: payload_digest(src.view(torch.uint8)), args.reps)
    del src, dst
    torch.cuda.empty_cache()

    spec = _spec(size)
    g = torch.Generator(device="cuda").manual_seed(size)
    tensors = {name: torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_(generator=g)
               for name, shape in spec}
    nbytes = sum(t.numel() * 2 for t in tensors.values())
    endpoint = f"shm://bench-ipc-{uuid.uuid4().hex[:8]}"
    versions = args.reps + 1
    cmd = [sys.executable, __file__, "--role", "receiver", "--endpoint", endpoint, "--spec", json.dumps(spec),
           "--versions", str(versions), "--bucket-mb", str(args.bucket_mb), "--timeout", str(args.timeout)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # stderr to a file: an undrained pipe would block a receiver that logs a lot
    errors = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env, cwd=ROOT)
    proc.errors = errors
    try:
        assert _read(proc, args.timeout)["ready"]
        cfg = SyncConfig(transport="cuda_ipc", bucket_mb=args.bucket_mb, timeout_s=args.timeout,
                         ipc_inflight_buckets=args.window, ipc_copy_autotune=True)
        times, apply_s, phases = [], [], []
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(1, timeout=args.timeout)
            for v in range(1, versions + 1):
                res = pub.publish({name.replace(".", "_"): t for name, t in tensors.items()})
                line = _read(proc, args.timeout)
                if v > 1:  # version 1 allocates buffers and opens the IPC handles
                    times.append(res.seconds)
                    apply_s.append(line["apply_s"])
                    phases.append(res.phases)
            buckets = res.buckets
        exact = line.get("digests") == _device_digests(tensors[name] for name, _ in spec)
        proc.wait(args.timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    best = min(times)
    return {"size": size, "bytes": nbytes, "copy_gbps": size / copy_s / 1e9, "digest_gbps": size / digest_s / 1e9,
            "ipc_gbps": nbytes / best / 1e9, "ipc_best_ms": best * 1e3, "ipc_median_ms": statistics.median(times) * 1e3,
            "ratio": (nbytes / best) / (size / copy_s), "apply_ms": statistics.median(apply_s) * 1e3,
            "encode_ms": min(p["encode"] for p in phases) * 1e3, "commit_ms": min(p["commit"] for p in phases) * 1e3,
            "buckets": buckets, "exact": exact, "copy_ms": copy_s * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", default="1,8", help="comma-separated sizes in GiB (fractions allowed)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 2 reps: checks the benchmark runs")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 instead of 0 without a CUDA device")
    ap.add_argument("--role", default="publisher", choices=["publisher", "receiver"])
    ap.add_argument("--endpoint")
    ap.add_argument("--spec")
    ap.add_argument("--versions", type=int, default=1)
    args = ap.parse_args()
    if args.role == "receiver":
        return receiver(args)
    if not torch.cuda.is_available():
        print("bench_cuda_ipc: needs a CUDA device (torch.cuda.is_available() is False); nothing measured")
        return 2 if args.require_gpu else 0
    if args.quick:
        args.sizes_gb, args.reps = "0.25", 2
    sizes = [int(float(x) * GIB) for x in args.sizes_gb.split(",") if x.strip()]
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / GIB:.0f} GiB; torch {torch.__version__}; "
          f"bucket {args.bucket_mb} MiB, window {args.window}, best of {args.reps} after one warm-up version")
    rows = [measure(size, args) for size in sizes]
    print()
    print("| size | copy_ GB/s | digest GB/s | cuda_ipc publish->committed GB/s | vs copy_ | best ms | median ms "
          "| copy_ ms | encode ms | commit ms | receiver apply ms | buckets | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size'] / GIB:g} GiB | {r['copy_gbps']:.0f} | {r['digest_gbps']:.0f} | {r['ipc_gbps']:.0f} | "
              f"{r['ratio'] * 100:.0f}% | {r['ipc_best_ms']:.1f} | {r['ipc_median_ms']:.1f} | {r['copy_ms']:.1f} | "
              f"{r['encode_ms']:.1f} | {r['commit_ms']:.1f} | {r['apply_ms']:.1f} | {r['buckets']} | "
              f"{'yes' if r['exact'] else 'NO'} |")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
