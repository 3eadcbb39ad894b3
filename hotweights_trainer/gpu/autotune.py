"""Choosing the chunk size and stream count of device copies: from the topology, or by measuring.

Two ways, each switched on by its own setting:

- **Heuristic** (``HOTWEIGHTS_IPC_COPY_AUTOTUNE=1`` for the CUDA-IPC path,
  ``HOTWEIGHTS_GPU_COPY_AUTOTUNE=1`` for the broadcast path): from the link between the copy's source
  and destination device (:meth:`.topology.Topology.link`), never below the configured values where
  it raises them:

  ============  ====================  =====================  =========================================
  link          chunk                 streams                why
  ============  ====================  =====================  =========================================
  ``same``      >= 64 MiB             >= 2                   one device: fewer, larger launches
  ``nvlink``    >= 64 MiB             >= 4                   several streams keep several links busy
  ``p2p``       >= 32 MiB             >= 2                   PCIe peer copies: overlap two DMA streams
  ``host``      <= 8 MiB              as configured          staged through host memory: small chunks
                                                             pipeline the two hops
  ============  ====================  =====================  =========================================

- **Microbenchmark** (``HOTWEIGHTS_GPU_COPY_MICRO=1``, broadcast path): copy
  ``HOTWEIGHTS_GPU_COPY_AUTOTUNE_MB`` on the device with every chunk size of
  ``HOTWEIGHTS_GPU_COPY_MICRO_CHUNKS_MB`` and stream count of ``HOTWEIGHTS_GPU_COPY_MICRO_STREAMS``,
  log the table and keep the fastest (:func:`pick_best`: among rows within 3% of the fastest, the
  fewest streams, then the smallest chunk -- less contention and less memory for no measurable loss).
  It wins over the heuristic when both are on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..config import SyncConfig, parse_int_list
from .topology import Topology

log = logging.getLogger(__name__)

MB = 1 << 20


@dataclass(frozen=True)
class CopyParams:
    chunk_bytes: int
    streams: int
    reason: str = ""


@dataclass(frozen=True)
class MicroRow:
    chunk_bytes: int
    streams: int
    seconds: float
    nbytes: int

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def heuristic(link: str, chunk_bytes: int, streams: int) -> CopyParams:
    """The chunk and stream count the table in the module docstring gives for ``link``."""
    if link == "same":
        return CopyParams(max(chunk_bytes, 64 * MB), max(streams, 2), "same device: fewer, larger launches")
    if link == "nvlink":
        return CopyParams(max(chunk_bytes, 64 * MB), max(streams, 4), "NVLink: more streams keep the links busy")
    if link == "p2p":
        return CopyParams(max(chunk_bytes, 32 * MB), max(streams, 2), "PCIe peer access: two overlapping streams")
    if link == "host":
        return CopyParams(min(chunk_bytes, 8 * MB), streams, "no peer access (staged through host): smaller chunks")
    raise ValueError(f"unknown link {link!r}")


def pick_best(rows: Sequence[MicroRow], tolerance: float = 0.03) -> MicroRow:
    """The row to use from a microbenchmark table (see the module docstring)."""
    if not rows:
        raise ValueError("empty microbenchmark table")
    fastest = min(r.seconds for r in rows)
    close = [r for r in rows if r.seconds <= fastest * (1 + tolerance)]
    return min(close, key=lambda r: (r.streams, r.chunk_bytes))


def format_table(rows: Sequence[MicroRow], chosen: Optional[MicroRow] = None) -> str:
    lines = [f"  {'chunk MiB':>9} {'streams':>7} {'ms':>9} {'GB/s':>8}"]
    for r in rows:
        mark = "  <- chosen" if r == chosen else ""
        lines.append(f"  {r.chunk_bytes // MB:>9} {r.streams:>7} {r.seconds * 1e3:>9.3f} {r.gbps:>8.1f}{mark}")
    return "\n".join(lines)


def run_micro(device: torch.device | str, total_bytes: int, chunks: Sequence[int], streams: Sequence[int],
              *, reps: int = 3) -> list[MicroRow]:
    """Measure a device-to-device copy of ``total_bytes`` per (chunk, streams); best of ``reps``."""
    from .scatter import DeviceScatter

    device = torch.device(device)
    src = torch.ones(total_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty(total_bytes, dtype=torch.uint8, device=device)
    rows = []
    try:
        for chunk in chunks:
            for n in streams:
                scatter = DeviceScatter(chunk, n)
                scatter.copy([(dst, src)], sync=True)  # warm-up: streams created, caches touched
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    scatter.copy([(dst, src)], sync=True)
                    best = min(best, time.perf_counter() - t0)
                rows.append(MicroRow(chunk, n, best, total_bytes))
    finally:
        del src, dst
    return rows


def resolve(config: SyncConfig, path: str, *, link: str, device: torch.device | str) -> CopyParams:
    """Chunk and streams for ``path`` (``"ipc"`` or ``"gpu"``) copying over ``link`` onto ``device``."""
    if path == "ipc":
        base = CopyParams(config.ipc_copy_chunk_mb * MB, config.ipc_copy_streams, "configured")
        tune, micro = config.ipc_copy_autotune, False
    elif path == "gpu":
        base = CopyParams(config.gpu_copy_chunk_mb * MB, config.gpu_copy_streams, "configured")
        tune, micro = config.gpu_copy_autotune, config.gpu_copy_micro
    else:
        raise ValueError(f"unknown copy path {path!r}")
    if micro:
        rows = run_micro(device, config.gpu_copy_autotune_mb * MB,
                         [c * MB for c in parse_int_list(config.gpu_copy_micro_chunks_mb)],
                         parse_int_list(config.gpu_copy_micro_streams))
        best = pick_best(rows)
        log.info("device-copy microbenchmark on %s over %d MiB:\n%s", device, config.gpu_copy_autotune_mb,
                 format_table(rows, best))
        return CopyParams(best.chunk_bytes, best.streams, f"microbenchmark on {device} ({best.gbps:.1f} GB/s)")
    if tune:
        chosen = heuristic(link, base.chunk_bytes, base.streams)
        log.info("%s copy autotune: %s link -> chunk %d MiB, %d stream(s) (%s)", path, link,
                 chosen.chunk_bytes // MB, chosen.streams, chosen.reason)
        return chosen
    return base


def link_between(topology: Topology, src: torch.device, dst: torch.device) -> str:
    """The link of :data:`.topology.LINKS` a copy from ``src`` to ``dst`` takes."""
    if src.type != "cuda" or dst.type != "cuda":
        return "same" if src == dst else "host"
    return topology.link(src.index or 0, dst.index or 0)


__all__ = ["CopyParams", "MicroRow", "heuristic", "pick_best", "format_table", "run_micro", "resolve",
           "link_between"]
