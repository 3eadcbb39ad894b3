"""The payload digest of device buckets, computed where the bytes are (GPU or CPU) with torch ops.

xxh3 needs the bytes on the host; copying a GPU bucket to the host just to checksum it would cost a
PCIe round trip per bucket, far slower than the device-to-device copy it protects. Device buckets
(``FLAG_DEVICE`` in the header) therefore carry this digest instead, computed by the publisher after
packing and by each receiver on its own copy.

Definition (payload length ``L``, a multiple of 4 bytes; every bucket payload is 64-aligned):

1. read the payload as little-endian int32 words and cut it into rows of ``ROW_WORDS`` = 1024 words
   (4 KiB); the last row may be shorter;
2. ``s_r`` = the exact sum of row ``r``'s words (an int64: 1024 int32 values cannot overflow it);
3. ``acc`` = sum over rows of ``s_r * w(r)`` modulo 2^64, with the odd row weight
   ``w(r) = (r * 0x9E3779B97F4A7C15 + 0xD6E8FEB86659FD93) | 1`` (mod 2^64);
4. the digest is ``splitmix64(acc ^ L)``.

Why this shape: step 2 is one reduction that reads the payload once at memory bandwidth, the only
full pass; steps 3-4 touch one value per 4 KiB. Integer sums are exact and associative modulo 2^64,
so any reduction order -- any GPU, any chunking, the CPU -- gives the same digest, and a payload can
be digested in row-aligned chunks right after each chunk was written, while it is still in cache
(:class:`DigestAccumulator`).

What it detects: any change to a single word (every bit flip), any change to a row's sum, rows moved
or swapped (the weights differ per row), truncation or a wrong length, and a stale or overwritten
buffer. It does not detect changes that keep every row's sum (e.g. two words swapped within one 4 KiB
row). It guards against transport faults -- a reused buffer, a wrong handle, a torn copy -- not
against an adversary; ``HOTWEIGHTS_HANDLE_TOKEN`` signs the handles themselves.
"""

from __future__ import annotations

from typing import Optional

import torch

ROW_WORDS = 1024
ROW_BYTES = ROW_WORDS * 4
_MASK = (1 << 64) - 1
_W_MUL = 0x9E3779B97F4A7C15
_W_ADD = 0xD6E8FEB86659FD93


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 torch computes with (same bits)."""
    x &= _MASK
    return x - (1 << 64) if x >= 1 << 63 else x


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser: every input bit affects every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def row_weight(r: int) -> int:
    """``w(r)`` as an unsigned 64-bit integer (reference for tests and the docs)."""
    return ((r * _W_MUL + _W_ADD) & _MASK) | 1


def _partial(chunk: torch.Tensor, first_row: int) -> torch.Tensor:
    """sum_r s_r * w(first_row + r) mod 2^64 for a row-aligned uint8 chunk, as a 0-d int64 tensor.

    Stays on the chunk's device and does not synchronise.
    """
    n = chunk.numel()
    if n % 4:
        raise ValueError(f"digest input must be a multiple of 4 bytes, got {n}")
    words = chunk.view(torch.int32)
    full = words.numel() // ROW_WORDS
    sums = []
    if full:
        sums.append(words[:full * ROW_WORDS].view(full, ROW_WORDS).sum(dim=1, dtype=torch.int64))
    if words.numel() > full * ROW_WORDS:
        sums.append(words[full * ROW_WORDS:].sum(dtype=torch.int64).reshape(1))
    if not sums:
        return torch.zeros((), dtype=torch.int64, device=chunk.device)
    s = sums[0] if len(sums) == 1 else torch.cat(sums)
    rows = torch.arange(first_row, first_row + s.numel(), dtype=torch.int64, device=chunk.device)
    # int64 arithmetic wraps modulo 2^64 on every torch backend; the bits equal the unsigned result.
    w = torch.bitwise_or(rows * _signed(_W_MUL) + _signed(_W_ADD), 1)
    return (s * w).sum()


class DigestAccumulator:
    """Digest a payload chunk by chunk (each chunk starting on a 4 KiB row) without host syncs.

    ``add`` only enqueues work on the current stream of the chunk's device; :meth:`value` syncs once.
    Chunks may come in any order, and from several streams when the caller makes the final stream
    wait for them (see :mod:`.scatter`); every byte must be added exactly once.
    """

    def __init__(self, length: int, device: torch.device | str = "cpu"):
        if length < 0 or length % 4:
            raise ValueError(f"digest length must be a non-negative multiple of 4, got {length}")
        self.length = length
        self.device = torch.device(device)
        self._parts: list[torch.Tensor] = []
        self._added = 0

    def add(self, chunk: torch.Tensor, offset: int) -> None:
        if offset % ROW_BYTES:
            raise ValueError(f"digest chunks must start on a {ROW_BYTES}-byte row, got offset {offset}")
        if offset + chunk.numel() > self.length:
            raise ValueError(f"chunk [{offset}, +{chunk.numel()}) is beyond the {self.length}-byte payload")
        if chunk.numel() % ROW_BYTES and offset + chunk.numel() != self.length:
            raise ValueError("only the last chunk of a payload may end inside a row")
        self._parts.append(_partial(chunk, offset // ROW_BYTES))
        self._added += chunk.numel()

    def value(self) -> int:
        """The digest (synchronises with the device once)."""
        if self._added != self.length:
            raise ValueError(f"digest covers {self._added} of {self.length} bytes")
        if not self._parts:
            acc = 0
        else:
            total = self._parts[0] if len(self._parts) == 1 else torch.stack(
                [p.to(self._parts[0].device) for p in self._parts]).sum()
            acc = int(total.item()) & _MASK
        return splitmix64(acc ^ self.length)


def payload_digest(payload: torch.Tensor, *, chunk_bytes: Optional[int] = None) -> int:
    """The digest of a whole uint8 payload tensor (optionally computed in row-aligned chunks)."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError("payload_digest takes a 1-D uint8 tensor")
    acc = DigestAccumulator(payload.numel(), payload.device)
    step = payload.numel() if not chunk_bytes else max(chunk_bytes // ROW_BYTES, 1) * ROW_BYTES
    for off in range(0, payload.numel(), max(step, 1)):
        acc.add(payload[off:off + step], off)
    return acc.value()


def reference_digest(data: bytes) -> int:
    """The same digest computed in pure Python from the definition (slow; for tests)."""
    import struct

    if len(data) % 4:
        raise ValueError("length must be a multiple of 4")
    words = struct.unpack(f"<{len(data) // 4}i", data)
    acc = 0
    for r in range(0, -(-len(words) // ROW_WORDS)):
        acc += sum(words[r * ROW_WORDS:(r + 1) * ROW_WORDS]) * row_weight(r)
    return splitmix64((acc & _MASK) ^ len(data))


__all__ = ["DigestAccumulator", "payload_digest", "reference_digest", "ROW_BYTES", "ROW_WORDS", "splitmix64",
           "row_weight"]
