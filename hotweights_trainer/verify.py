"""Bit-exact fingerprints of weights, for checking a receiver against its trainer across processes."""

from __future__ import annotations

from typing import Any

import torch
import xxhash

from .source import iter_source


def tensor_digest(t: torch.Tensor) -> str:
    """xxh3-64 of a tensor's raw bytes (dtype and shape included), as hex."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h = xxhash.xxh3_64(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def weights_digest(source: Any) -> dict[str, str]:
    """Per-tensor digests of a module / mapping / iterable, keyed by normalised name."""
    return {name: tensor_digest(t) for name, t in iter_source(source)}


def combined_digest(digests: dict[str, str]) -> str:
    h = xxhash.xxh3_64()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


def diff_digests(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names whose bytes differ or that exist on one side only."""
    names = set(expected) | set(actual)
    return sorted(n for n in names if expected.get(n) != actual.get(n))
