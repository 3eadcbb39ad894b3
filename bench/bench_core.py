"""Core engine benchmark: publish -> committed over shm:// for ~1 GiB of bf16 tensors.

Compared in the same run against:
  * memcpy bandwidth (torch ``copy_`` between two pre-faulted buffers): the physical limit;
  * a per-tensor ``torch.distributed.broadcast`` over gloo between two processes (what users write by hand);
  * a ``safetensors`` save_file -> load_file round trip (the file-based way).

The references (one memcpy, one per-tensor and one flat gloo broadcast) run right after each steady
hotweights version, with every process kept alive in between, and the ratios are taken version by
version: on a shared machine the load drifts within one run, and pairing keeps it out of the ratios.
The first two versions are warm-up (each maps a fresh set of shm blocks) and are reported apart.

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
from typing import Optional

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


WARMUP_VERSIONS = 2
"""Versions not counted as steady: the first two each map a fresh set of shm blocks (a version's blocks
stay readable while it is the current one, so versions alternate between two sets once both exist)."""


class _Memcpy:
    """A timed copy of ``nbytes`` between two pre-faulted buffers, repeatable between other runs."""

    def __init__(self, nbytes: int):
        self.src = torch.ones(nbytes, dtype=torch.uint8)
        self.dst = torch.zeros(nbytes, dtype=torch.uint8)
        self.dst.copy_(self.src)

    def once(self, tries: int = 3) -> float:
        """Median of ``tries`` copies: one copy is as exposed to a descheduled thread as one publish."""
        times = []
        for _ in range(tries):
            t = time.perf_counter()
            self.dst.copy_(self.src)
            times.append(time.perf_counter() - t)
        return statistics.median(times)


class _Gloo:
    """Two gloo processes kept alive so that their broadcasts can be timed between hotweights versions."""

    def __init__(self, shapes: dict[str, int]):
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.cmds = [ctx.Queue(), ctx.Queue()]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [ctx.Process(target=_gloo_worker, args=(r, port, shapes, self.cmds[r], self.out), daemon=True)
                      for r in (0, 1)]
        for p in self.procs:
            p.start()

    def run(self, flat: bool) -> float:
        for q in self.cmds:
            q.put("flat" if flat else "per")
        return self.out.get(timeout=600)

    def close(self) -> None:
        for q in self.cmds:
            q.put("stop")
        for p in self.procs:
            p.join(60)


def _gloo_worker(rank: int, port: int, shapes: dict[str, int], cmds: "mp.Queue", out: "mp.Queue") -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flat = torch.zeros(sum(shapes.values()), dtype=torch.bfloat16)
    per = list(flat.split(list(shapes.values())))  # one tensor per parameter, as users write it
    while (cmd := cmds.get()) != "stop":
        dist.barrier()
        t = time.perf_counter()
        for x in ([flat] if cmd == "flat" else per):
            dist.broadcast(x, src=0)
        dist.barrier()
        if rank == 1:
            out.put(time.perf_counter() - t)
    dist.destroy_process_group()


def bench_hotweights(tensors: dict[str, torch.Tensor], reps: int, bucket_mb: int, delta: str = "off",
                     memcpy: Optional[_Memcpy] = None, gloo: Optional[_Gloo] = None) -> dict:
    """``reps`` steady versions after :data:`WARMUP_VERSIONS`. With ``memcpy`` / ``gloo``, each version
    is followed by one memcpy and one run of each gloo broadcast, so every steady version is compared
    with references measured right next to it (the load on a shared machine drifts within a run)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    endpoint = f"shm://bench-{os.getpid()}"
    shapes = {k: v.numel() for k, v in tensors.items()}
    versions = reps + WARMUP_VERSIONS
    p = ctx.Process(target=receiver_proc, args=(endpoint, shapes, versions, q, delta), daemon=True)
    p.start()
    rows = []
    with WeightPublisher(endpoint, config=SyncConfig(bucket_mb=bucket_mb, timeout_s=120, delta=delta)) as pub:
        tag, rx_memcpy = q.get(timeout=120)
        pub.wait_for_receivers(1, timeout=120)
        for v in range(1, versions + 1):
            with torch.no_grad():
                for t in tensors.values():  # a new version: every tensor changes a little
                    t.view(torch.int16).add_(1)
            res = pub.publish(tensors)
            _, ver, apply_s, apply_b = q.get(timeout=120)
            refs = {}
            if memcpy is not None and v > WARMUP_VERSIONS:
                refs["memcpy"] = memcpy.once()
            if gloo is not None and v > WARMUP_VERSIONS:
                refs["gloo_per"] = gloo.run(flat=False)
                refs["gloo_flat"] = gloo.run(flat=True)
            rows.append((res.seconds, res.bytes_sent, apply_s, apply_b, res.phases, refs))
    p.join(30)
    steady = rows[WARMUP_VERSIONS:]
    med = statistics.median
    out = {"first_s": rows[0][0], "second_s": rows[1][0], "s": med(r[0] for r in steady), "bytes": steady[0][1],
           "apply_s": med(r[2] for r in steady), "apply_bytes": steady[0][3], "rx_memcpy_gbps": rx_memcpy,
           "phases": {k: med(r[4][k] for r in steady) for k in steady[0][4]}}
    for key in steady[0][5]:
        out[key] = med(r[5][key] for r in steady)
        # hotweights time / reference time, version by version; the median of those is what we report
        out[key + "_per_version"] = [r[5][key] / r[0] for r in steady]
    return out


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

    mem_before = memcpy_gbps(nbytes)
    # Every rep changes every element, so this measures the dense data path; "auto" shows what the
    # default delta mode costs on such an update (it falls back to dense and backs off).
    gloo = None if args.skip_gloo else _Gloo(shapes)
    try:
        hw = bench_hotweights(tensors, args.reps, args.bucket_mb, delta="off", memcpy=_Memcpy(nbytes), gloo=gloo)
    finally:
        if gloo is not None:
            gloo.close()
    hw_auto = bench_hotweights(tensors, args.reps, args.bucket_mb, delta="auto")
    st = bench_safetensors(tensors, max(2, args.reps // 2))
    mem_s = hw["memcpy"]  # measured between the steady versions, like every reference below
    mem = nbytes / mem_s / 1e9
    rows = [("memcpy (torch copy_, pre-faulted)", mem_s, mem),
            ("hotweights shm:// publish->committed (steady)", hw["s"], nbytes / hw["s"] / 1e9),
            ("hotweights shm:// first version (maps blocks)", hw["first_s"], nbytes / hw["first_s"] / 1e9),
            ("hotweights shm:// second version (maps blocks)", hw["second_s"], nbytes / hw["second_s"] / 1e9),
            ("hotweights, default delta=auto, all changed", hw_auto["s"], nbytes / hw_auto["s"] / 1e9),
            ("safetensors save_file->load_file", st, nbytes / st / 1e9)]
    if gloo is not None:
        rows += [("gloo broadcast, one call per tensor", hw["gloo_per"], nbytes / hw["gloo_per"] / 1e9),
                 ("gloo broadcast, one flat tensor", hw["gloo_flat"], nbytes / hw["gloo_flat"] / 1e9)]
    print(f"\n| {'method':<48} | {'seconds':>8} | {'GB/s':>6} | {'vs memcpy':>9} | {'hotweights speedup':>18} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 8}|{'-' * 11}|{'-' * 20}|")
    for name, sec, gbps in rows:
        print(f"| {name:<48} | {sec:>8.3f} | {gbps:>6.2f} | {gbps / mem:>8.0%} | {sec / hw['s']:>17.1f}x |")
    med = statistics.median
    print(f"\nshm / memcpy bandwidth: {med(hw['memcpy_per_version']):.0%} (median over the {args.reps} steady "
          f"versions of memcpy time / publish time, each memcpy run right after its version; per version: "
          f"{', '.join(f'{x:.0%}' for x in hw['memcpy_per_version'])}; memcpy before the run: "
          f"{nbytes / mem_before / 1e9:.3f} s)")
    if gloo is not None:
        print(f"speedup over per-tensor gloo broadcast: {med(hw['gloo_per_per_version']):.1f}x (same pairing; "
              f"per version: {', '.join(f'{x:.1f}x' for x in hw['gloo_per_per_version'])})")
    pause_ratio = hw["apply_s"] / (hw["apply_bytes"] / hw["rx_memcpy_gbps"] / 1e9)
    print(f"\nreceiver pause: {hw['apply_s'] * 1e3:.1f} ms for {hw['apply_bytes'] / 2**30:.2f} GiB "
          f"= {pause_ratio:.2f}x one memcpy of the applied bytes (receiver memcpy {hw['rx_memcpy_gbps']:.1f} GB/s)")
    print("publisher phases (median s): " + ", ".join(f"{k}={v:.3f}" for k, v in hw["phases"].items()))


if __name__ == "__main__":
    main()
