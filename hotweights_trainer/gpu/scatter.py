"""Device-side copies: chunked over several CUDA streams, plus applying a staged device version.

:class:`DeviceScatter` runs a list of byte copies (``dst`` and ``src`` are 1-D uint8 views) as the
pieces :func:`.chunks.plan_pieces` gives it: each side stream first waits for the caller's current
stream (so sources written there are complete), runs its pieces in order, and the current stream
then waits for every side stream. With a :class:`~.checksum.DigestAccumulator`, the destination is
digested in one pass on the current stream once every piece is copied (digesting each piece right
behind its copy, while it is in cache, cost more in launches and Python than the second read:
bench/bench_device_copy.py). Small pieces on one stream go through one ``torch._foreach_copy_``
(one launch for many tensors) where torch has it. Copies within one device are not cut into pieces:
each runs whole on the current stream (see :meth:`DeviceScatter.copy`). On the CPU, or for copies
that involve the host, pieces simply run one after another.

The same class serves the CUDA-IPC receivers (pulling a bucket into a staged buffer;
``HOTWEIGHTS_IPC_COPY_*``), and applying a staged device version into the model on every device
path (``HOTWEIGHTS_IPC_COPY_*`` for CUDA IPC, ``HOTWEIGHTS_GPU_COPY_*`` for the broadcast path):
:func:`hotweights_trainer.receive.apply.apply_device`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Optional, Sequence

import torch

from .checksum import DigestAccumulator
from .chunks import plan_pieces
from .topology import PathUsage, device_label

log = logging.getLogger(__name__)

SMALL_PIECE = 1 << 20
"""Pieces below this many bytes are batched into one multi-tensor copy per stream."""


class DeviceScatter:
    """Chunked byte copies over ``streams`` CUDA streams (see the module docstring)."""

    def __init__(self, chunk_bytes: int, streams: int, *, paths: Optional[PathUsage] = None, reason: str = ""):
        if chunk_bytes < 1 or streams < 1:
            raise ValueError(f"chunk_bytes and streams must be >= 1, got {chunk_bytes}, {streams}")
        self.chunk_bytes = chunk_bytes
        self.streams = streams
        self.paths = paths
        self.reason = reason
        self._streams: dict[int, list[Any]] = {}
        self.last_seconds = 0.0

    def __repr__(self) -> str:
        return f"DeviceScatter(chunk={self.chunk_bytes >> 20} MiB, streams={self.streams})"

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
             digest: Optional[DigestAccumulator] = None, sync: bool = True) -> int:
        """Copy every ``(dst, src)`` pair of 1-D uint8 views; returns the bytes copied.

        ``digest``: digest the destination once it is copied (a single pair, the whole payload).
        ``sync``: return only once the copies are complete (the caller may reuse the sources).
        """
        t0 = time.perf_counter()
        sizes = []
        for dst, src in pairs:
            if dst.dtype != torch.uint8 or src.dtype != torch.uint8 or dst.dim() != 1 or src.dim() != 1:
                raise ValueError("DeviceScatter copies 1-D uint8 views")
            if dst.numel() != src.numel():
                raise ValueError(f"copy size mismatch: dst {dst.numel()} bytes, src {src.numel()} bytes")
            sizes.append(dst.numel())
        if digest is not None and len(pairs) != 1:
            raise ValueError("a digested copy takes exactly one (dst, src) pair")
        cuda = any(d.is_cuda or s.is_cuda for d, s in pairs)
        # Same-device copies run whole on the current stream: one copy_ already saturates the device's
        # memory, and 16 MiB pieces over two streams made a 256 MiB bucket 3.5x slower on an H200 in
        # launches and Python (bench/bench_device_copy.py). The chunk and stream knobs shape the
        # copies that cross a link (peer devices, host and device).
        local = [(d, s) for d, s in pairs if d.is_cuda and s.is_cuda and d.device == s.device]
        linked = [(d, s) for d, s in pairs if not (d.is_cuda and s.is_cuda and d.device == s.device)]
        pieces = plan_pieces([d.numel() for d, _ in linked], self.chunk_bytes, self.streams if cuda else 1)
        if self.paths is not None:
            per_path: dict[str, int] = {}
            for label in [_path(*linked[p.task]) for p in pieces] + [_path(d, s) for d, s in local]:
                per_path[label] = per_path.get(label, 0) + 1
            for label, n in per_path.items():
                self.paths.record(label, n)
        if not cuda:
            for p in pieces:
                dst, src = linked[p.task]
                d, s = dst[p.offset:p.offset + p.nbytes], src[p.offset:p.offset + p.nbytes]
                d.copy_(s)  # torch's parallel copy: applying runs while the server waits (hostcopy.py)
            if digest is not None:
                digest.add(pairs[0][0], 0)
        else:
            self._copy_cuda(local, linked, pieces, pairs[0][0] if digest is not None else None, digest, sync)
        self.last_seconds = time.perf_counter() - t0
        return sum(sizes)

    def _side_streams(self, device: torch.device) -> list[Any]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        streams = self._streams.get(index)
        if streams is None:
            streams = [torch.cuda.Stream(device=index) for _ in range(self.streams)]
            self._streams[index] = streams
        return streams

    def _copy_cuda(self, local, linked, pieces, digested, digest, sync) -> None:  # pragma: no cover - needs CUDA
        first_dst, first_src = (local or linked)[0]
        device = first_dst.device if first_dst.is_cuda else first_src.device
        with torch.cuda.device(device):
            current = torch.cuda.current_stream()
            _copy_batched(local, None)
            streams = self._side_streams(device) if pieces else []
            used = sorted({p.stream for p in pieces})
            for i in used:
                streams[i].wait_stream(current)
            small: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in pieces:
                dst, src = linked[p.task]
                d, s = dst[p.offset:p.offset + p.nbytes], src[p.offset:p.offset + p.nbytes]
                if p.nbytes < SMALL_PIECE and d.device == s.device:
                    small.setdefault(p.stream, []).append((d, s))
                    continue
                with torch.cuda.stream(streams[p.stream]):
                    d.copy_(s, non_blocking=True)
            for i, batch in small.items():
                _copy_batched(batch, streams[i])
            for i in used:
                current.wait_stream(streams[i])
            if digest is not None:
                digest.add(digested, 0)
            if sync:
                current.synchronize()


def _path(dst: torch.Tensor, src: torch.Tensor) -> str:
    return f"{device_label(src)}->{device_label(dst)}"


def _copy_batched(pairs, stream) -> None:  # pragma: no cover - needs a CUDA device
    """Large pairs one ``copy_`` each; pairs under :data:`SMALL_PIECE` in one ``_foreach_copy_`` launch."""
    if not pairs:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    small = [(d, s) for d, s in pairs if d.numel() < SMALL_PIECE and foreach is not None]
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for d, s in pairs:
            if d.numel() >= SMALL_PIECE or foreach is None:
                d.copy_(s, non_blocking=True)
        if small:
            foreach([d for d, _ in small], [s for _, s in small], non_blocking=True)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


__all__ = ["DeviceScatter", "SMALL_PIECE", "byte_view"]
