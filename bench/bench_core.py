"""Core engine benchmark: publish -> committed over shm:// for ~1 GiB of bf16 tensors.

Compared in the same run against:
  * memcpy bandwidth (torch ``copy_`` between two pre-faulted buffers): the physical limit;
  * a per-tensor ``torch.distributed.broadcast`` over gloo between two processes (what users write by hand);
  * a ``safetensors`` save_file -> load_file round trip (the file-based way).

Also reports the receiver pause (time the model is locked while applying) against one memcpy of the
applied bytes measured in the receiver process. Run: ``python bench/bench_core.py [--gib 1] [--reps 5]``.
Absolute numbers on shared machines are noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver  # noqa: E402


def make_tensors(total_bytes: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    per = total_bytes // n // 2  # bf16 elements per tensor
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(per, generator=g).to(torch.bfloat16) for i in range(n)}


class FlatModel(torch.nn.Module):
    def __init__(self, shapes: dict[str, int]):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for i, (_, numel) in enumerate(shapes.items()):
            m = torch.nn.Module()
            m.weight = torch.nn.Parameter(torch.zeros(numel, dtype=torch.bfloat16))
            self.layers.append(m)


def memcpy_gbps(nbytes: int, reps: int = 5) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dst.copy_(src)  # fault both in
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best.append(time.perf_counter() - t)
    return nbytes / statistics.median(best) / 1e9


def receiver_proc(endpoint: str, shapes: dict[str, int], reps: int, out: "mp.Queue", delta: str) -> None:
    model = FlatModel(shapes)
    nbytes = sum(shapes.values()) * 2
    with WeightReceiver(endpoint, model=model, config=SyncConfig(timeout_s=120, delta=delta)) as rx:
        out.put(("ready", memcpy_gbps(nbytes)))
        for v in range(1, reps + 1):
            rx.wait_for_version(v)
            out.put(("applied", v, rx.last_apply_seconds, rx.last_apply_bytes))


def bench_hotweights(tensors: dict[str, torch.Tensor], reps: int, bucket_mb: int, delta: str = "off") -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    endpoint = f"shm://bench-{os.getpid()}"
    shapes = {k: v.numel() for k, v in tensors.items()}
    p = ctx.Process(target=receiver_proc, args=(endpoint, shapes, reps, q, delta), daemon=True)
    p.start()
    rows = []
    with WeightPublisher(endpoint, config=SyncConfig(bucket_mb=bucket_mb, timeout_s=120, delta=delta)) as pub:
        tag, rx_memcpy = q.get(timeout=120)
        pub.wait_for_receivers(1, timeout=120)
        for v in range(1, reps + 1):
            with torch.no_grad():
                for t in tensors.values():  # a new version: every tensor changes a little
                    t.view(torch.int16).add_(1)
            res = pub.publish(tensors)
            _, ver, apply_s, apply_b = q.get(timeout=120)
            rows.append((res.seconds, res.bytes_sent, apply_s, apply_b, res.phases))
    p.join(30)
    first = rows[0]
    steady = rows[1:] or rows
    sec = statistics.median(r[0] for r in steady)
    return {"first_s": first[0], "s": sec, "bytes": steady[0][1], "apply_s": statistics.median(r[2] for r in steady),
            "apply_bytes": steady[0][3], "rx_memcpy_gbps": rx_memcpy,
            "phases": {k: statistics.median(r[4][k] for r in steady) for k in steady[0][4]}}


def _gloo_worker(rank: int, port: int, shapes: dict[str, int], reps: int, flat: bool, out: "mp.Queue") -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensors = [torch.zeros(n, dtype=torch.bfloat16) for n in shapes.values()]
    if flat:
        tensors = [torch.zeros(sum(shapes.values()), dtype=torch.bfloat16)]
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        for x in tensors:
            dist.broadcast(x, src=0)
        dist.barrier()
        times.append(time.perf_counter() - t)
    if rank == 1:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def bench_gloo(shapes: dict[str, int], reps: int, flat: bool) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, shapes, reps, flat, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    result = q.get(timeout=600)
    for p in procs:
        p.join(60)
    return result


def bench_safetensors(tensors: dict[str, torch.Tensor], reps: int) -> float:
    from safetensors.torch import load_file, save_file

    times = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        for _ in range(reps):
            t = time.perf_counter()
            save_file(tensors, path)
            loaded = load_file(path)
            for v in loaded.values():  # make sure every byte was really read
                v.view(-1)[:1].item()
            times.append(time.perf_counter() - t)
            os.remove(path)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tensors", type=int, default=256, help="number of tensors the bytes are split into")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=SyncConfig().bucket_mb)
    ap.add_argument("--skip-gloo", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-sized run (32 MiB, 2 reps) that checks the script works; numbers mean nothing")
    args = ap.parse_args()
    if args.quick:
        args.gib, args.tensors, args.reps = 1 / 32, 32, 2
    total = int(args.gib * (1 << 30))
    tensors = make_tensors(total, args.tensors)
    nbytes = sum(t.numel() * 2 for t in tensors.values())
    shapes = {k: v.numel() for k, v in tensors.items()}
    print(f"# {nbytes / 2**30:.2f} GiB of bf16 in {len(tensors)} tensors, bucket {args.bucket_mb} MiB, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", flush=True)

    mem = memcpy_gbps(nbytes)
    # Every rep changes every element, so this measures the dense data path; "auto" shows what the
    # default delta mode costs on such an update (it falls back to dense and backs off).
    hw = bench_hotweights(tensors, args.reps + 1, args.bucket_mb, delta="off")
    hw_auto = bench_hotweights(tensors, args.reps + 1, args.bucket_mb, delta="auto")
    st = bench_safetensors(tensors, max(2, args.reps // 2))
    rows = [("memcpy (torch copy_, pre-faulted)", nbytes / mem / 1e9, mem),
            ("hotweights shm:// publish->committed (steady)", hw["s"], nbytes / hw["s"] / 1e9),
            ("hotweights shm:// first version (allocates)", hw["first_s"], nbytes / hw["first_s"] / 1e9),
            ("hotweights, default delta=auto, all changed", hw_auto["s"], nbytes / hw_auto["s"] / 1e9),
            ("safetensors save_file->load_file", st, nbytes / st / 1e9)]
    if not args.skip_gloo:
        per = bench_gloo(shapes, max(2, args.reps // 2), flat=False)
        flat = bench_gloo(shapes, max(2, args.reps // 2), flat=True)
        rows += [("gloo broadcast, one call per tensor", per, nbytes / per / 1e9),
                 ("gloo broadcast, one flat tensor", flat, nbytes / flat / 1e9)]
    print(f"\n| {'method':<48} | {'seconds':>8} | {'GB/s':>6} | {'vs memcpy':>9} | {'hotweights speedup':>18} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 8}|{'-' * 11}|{'-' * 20}|")
    for name, sec, gbps in rows:
        print(f"| {name:<48} | {sec:>8.3f} | {gbps:>6.2f} | {gbps / mem:>8.0%} | {sec / hw['s']:>17.1f}x |")
    pause_ratio = hw["apply_s"] / (hw["apply_bytes"] / hw["rx_memcpy_gbps"] / 1e9)
    print(f"\nreceiver pause: {hw['apply_s'] * 1e3:.1f} ms for {hw['apply_bytes'] / 2**30:.2f} GiB "
          f"= {pause_ratio:.2f}x one memcpy of the applied bytes (receiver memcpy {hw['rx_memcpy_gbps']:.1f} GB/s)")
    print("publisher phases (median s): " + ", ".join(f"{k}={v:.3f}" for k, v in hw["phases"].items()))


if __name__ == "__main__":
    main()
