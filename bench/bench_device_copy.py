"""Device copy strategies of the GPU data path, against one ``copy_`` of the same bytes, in one process.

    python bench/bench_device_copy.py                  # 256 MiB bucket, 4 GiB model on the GPU (64 MiB, 512 MiB on CPU)
    python bench/bench_device_copy.py --device cpu --bucket-mb 256 --model-mb 4096
    python bench/bench_device_copy.py --quick          # smoke-sized: checks the script runs

Two questions the cuda_ipc transport and the device apply depend on:

* **Digest a bucket piece by piece right behind its copies (in cache), or in one pass after them?**
  Rows: the copy in ``--chunk-mb`` pieces over ``--streams`` streams with a digest per piece (the
  earlier design), and ``DeviceScatter`` with one digest after it (now: a copy within one device runs
  whole).
* **How much does chunking cost when applying a version?** ``--model-mb`` of bf16 in 64 MiB tensors,
  copied from staged buffers into the model: one ``copy_`` per tensor, ``--chunk-mb`` pieces over
  ``--streams`` streams (earlier), ``DeviceScatter`` (now), and one ``torch._foreach_copy_``.

Each row is the best of ``--reps`` after a warm-up, timed with a full synchronisation around it, so
the Python that queues the work counts (it is what the transport pays). ``vs copy_`` is the row's
bandwidth over one ``copy_`` of the same bytes in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hotweights_trainer.gpu.checksum import DigestAccumulator  # noqa: E402
from hotweights_trainer.gpu.chunks import plan_pieces  # noqa: E402
from hotweights_trainer.gpu.scatter import DeviceScatter  # noqa: E402

MIB = 1 << 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, reps: int, device: torch.device) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _pieces_over_streams(pairs, chunk: int, streams: int, acc: DigestAccumulator | None = None) -> None:
    """The earlier design: every copy cut into ``chunk`` pieces over ``streams`` side streams, each
    piece digested on its stream right behind its copy (with ``acc``)."""
    sizes = [d.numel() for d, _ in pairs]
    cuda = pairs[0][0].is_cuda
    pieces = plan_pieces(sizes, chunk, streams if cuda else 1)
    if not cuda:
        for p in pieces:
            d = pairs[p.task][0][p.offset:p.offset + p.nbytes]
            d.copy_(pairs[p.task][1][p.offset:p.offset + p.nbytes])
            if acc is not None:
                acc.add(d, p.offset)
        return
    current = torch.cuda.current_stream()
    side = _SIDE.setdefault(streams, [torch.cuda.Stream() for _ in range(streams)])
    for s in side:
        s.wait_stream(current)
    for p in pieces:
        with torch.cuda.stream(side[p.stream]):
            d = pairs[p.task][0][p.offset:p.offset + p.nbytes]
            d.copy_(pairs[p.task][1][p.offset:p.offset + p.nbytes], non_blocking=True)
            if acc is not None:
                acc.add(d, p.offset)
    for s in side:
        current.wait_stream(s)


_SIDE: dict[int, list] = {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bucket-mb", type=int, default=None, help="default 256 on a GPU, 64 on the CPU")
    ap.add_argument("--model-mb", type=int, default=None, help="default 4096 on a GPU, 512 on the CPU")
    ap.add_argument("--chunk-mb", type=int, default=16, help="HOTWEIGHTS_IPC_COPY_CHUNK_MB's default")
    ap.add_argument("--streams", type=int, default=2, help="HOTWEIGHTS_IPC_COPY_STREAMS's default")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="16 MiB bucket, 128 MiB model, 1 rep")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.bucket_mb, args.model_mb, args.reps = 16, 128, 1
    args.bucket_mb = args.bucket_mb or (256 if gpu else 64)
    args.model_mb = args.model_mb or (4096 if gpu else 512)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_device_copy: no CUDA device here; pass --device cpu to run it on the CPU")
        return 0
    chunk = args.chunk_mb * MIB
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; chunk {args.chunk_mb} MiB, {args.streams} streams, "
          f"best of {args.reps}\n")
    rows = []

    n = args.bucket_mb * MIB
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ref = _best(lambda: dst.copy_(src), args.reps, device)
    scatter = DeviceScatter(chunk, args.streams)

    def per_piece_digest() -> int:
        acc = DigestAccumulator(n, device)
        _pieces_over_streams([(dst, src)], chunk, args.streams, acc)
        return acc.value()

    def scatter_then_digest() -> int:
        acc = DigestAccumulator(n, device)
        scatter.copy([(dst, src)], digest=acc, sync=False)
        return acc.value()

    for label, fn in (("bucket: copy_ (reference)", lambda: dst.copy_(src)),
                      ("bucket: pieces over streams, digest per piece (earlier)", per_piece_digest),
                      ("bucket: DeviceScatter, then one digest (now)", scatter_then_digest)):
        rows.append((label, n, _best(fn, args.reps, device), ref))
    assert per_piece_digest() == scatter_then_digest()

    count = max(args.model_mb // 64, 1)
    staged = [torch.randn(32 * MIB, device=device).to(torch.bfloat16) for _ in range(count)]
    model = [torch.empty_like(t) for t in staged]
    total = sum(t.numel() * 2 for t in staged)
    flat_src = torch.empty(total, dtype=torch.uint8, device=device)
    flat_dst = torch.empty_like(flat_src)
    ref = _best(lambda: flat_dst.copy_(flat_src), args.reps, device)
    flat_src = flat_dst = None  # noqa: F841 - only the reference copy needed them
    pairs = [(m.view(-1).view(torch.uint8), s.view(-1).view(torch.uint8)) for m, s in zip(model, staged)]

    def per_tensor() -> None:
        for m, s in zip(model, staged):
            m.copy_(s, non_blocking=True)

    foreach = getattr(torch, "_foreach_copy_", None)
    apply_rows = [("apply: one copy_ of all bytes (reference)", None),
                  ("apply: copy_ per tensor", per_tensor),
                  (f"apply: {args.chunk_mb} MiB pieces over {args.streams} streams (earlier)",
                   lambda: _pieces_over_streams(pairs, chunk, args.streams)),
                  ("apply: DeviceScatter (now)", lambda: scatter.copy(pairs, sync=False))]
    if foreach is not None:
        apply_rows.append(("apply: one _foreach_copy_", lambda: foreach(model, staged, non_blocking=True)))
    for label, fn in apply_rows:
        rows.append((label, total, ref if fn is None else _best(fn, args.reps, device), ref))
    assert all(torch.equal(m, s) for m, s in zip(model, staged))

    print("| strategy | MiB | ms | GB/s | vs copy_ |")
    print("|---|---|---|---|---|")
    for label, nbytes, sec, ref_s in rows:
        print(f"| {label} | {nbytes // MIB} | {sec * 1e3:.2f} | {nbytes / sec / 1e9:.0f} | {ref_s / sec:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
