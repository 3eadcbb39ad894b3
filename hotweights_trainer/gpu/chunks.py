"""Copy planning: cut copies into chunks and spread the chunks over streams (pure, no device needed).

A device-side scatter (a staged bucket into parameters, or a receiver pulling a bucket over CUDA
IPC) is a list of byte copies of very different sizes: a few huge embedding or MLP matrices and many
small norms and biases. :func:`plan_pieces` cuts every copy into pieces of at most ``chunk_bytes``
and gives each piece, in order, to the stream that has been given the fewest bytes so far (ties go
to the lowest stream index). Large copies are thereby split across every stream, small ones fill
in, and no stream carries more than one piece's worth of bytes above the others. The order of
pieces within one stream follows the order of the copies, so reads and writes stay sequential.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class Piece:
    task: int
    """Index of the copy this piece belongs to."""
    offset: int
    """Byte offset of the piece within that copy."""
    nbytes: int
    stream: int
    """Index of the stream the piece runs on."""


def plan_pieces(sizes: Sequence[int], chunk_bytes: int, streams: int) -> list[Piece]:
    """Pieces of at most ``chunk_bytes`` covering every copy in ``sizes``, balanced over ``streams``."""
    problems = []
    if chunk_bytes < 1:
        problems.append(f"copy chunk must be >= 1 byte, got {chunk_bytes}")
    if streams < 1:
        problems.append(f"copy streams must be >= 1, got {streams}")
    if any(s < 0 for s in sizes):
        problems.append("copy sizes must be >= 0")
    if problems:
        raise ConfigError(problems)
    loads = [0] * streams
    out: list[Piece] = []
    for task, size in enumerate(sizes):
        for off in range(0, size, chunk_bytes):
            n = min(chunk_bytes, size - off)
            s = min(range(streams), key=lambda i: (loads[i], i))
            loads[s] += n
            out.append(Piece(task, off, n, s))
    return out


def stream_loads(pieces: Sequence[Piece], streams: int) -> list[int]:
    """Bytes per stream of a plan."""
    loads = [0] * streams
    for p in pieces:
        loads[p.stream] += p.nbytes
    return loads


__all__ = ["Piece", "plan_pieces", "stream_loads"]
