"""Receiver-side staging: verify buckets and check them against the model, until a version is whole.

A :class:`StagedVersion` collects the verified buckets of one version. It is complete only when
``end`` arrived, every bucket index is present, every tensor is covered exactly once and the manifest
digest matches the publisher's. Nothing touches the model until then (:mod:`.apply` does, once it is
committed).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .device_bucket import DeviceBucket
from ..errors import ManifestMismatchError, WireFormatError
from ..naming import strip_wrappers
from ..source import unwrap_model
from ..wire.bucket import ENC_DENSE, BucketHeader, Entry
from ..wire.dtypes import dtype_name
from ..wire.manifest import ManifestBuilder


def build_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of everything a publisher may update: parameters and persistent buffers.

    Tied tensors appear under every name they have, so either name resolves.
    """
    model = unwrap_model(model)
    targets: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            targets.setdefault(strip_wrappers(name), t)
    return targets


def required_groups(targets: dict[str, torch.Tensor]) -> list[list[str]]:
    """The model's tensors as lists of the names each one has (a tied tensor has several)."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in targets.items():
        by_tensor.setdefault(id(t), []).append(name)
    return list(by_tensor.values())


def entry_problem(entry: Entry, target: Optional[torch.Tensor]) -> Optional[str]:
    if target is None:
        return "not in the receiver's model (unknown name)"
    if tuple(target.shape) != entry.shape:
        return f"shape mismatch: sent {list(entry.shape)}, model has {list(target.shape)}"
    if target.dtype != entry.dtype:
        return f"dtype mismatch: sent {dtype_name(entry.dtype)}, model has {dtype_name(target.dtype)}"
    return None


def payload_tensor(data: memoryview, header: BucketHeader, entry: Entry) -> torch.Tensor:
    """Zero-copy 1-D view of one entry's elements inside a bucket (host, or device: gpu/bucket.py)."""
    if isinstance(data, DeviceBucket):
        return data.entry(header, entry)
    with warnings.catch_warnings():
        # Shared-memory views are read-only on purpose; torch warns about that on every call.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8, count=entry.payload_nbytes,
                               offset=header.header_len + entry.payload_off)
    return raw.view(entry.dtype)


@dataclass
class StagedVersion:
    version: int
    session: int
    step: Optional[int] = None
    buckets: dict[int, tuple[BucketHeader, memoryview]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    manifest: ManifestBuilder = field(default_factory=ManifestBuilder)
    coverage: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    nbytes: int = 0
    complete: bool = False
    # Delta sync (hotweights_trainer/delta/shadow.py): receiver-private tensors per range
    # (name, elem_start, elem_count), used instead of the bucket bytes; ranges still needed from a
    # resync, with the xxh3 their delta entry announced; xxh3 of private tensors when known.
    private: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    needs: dict[tuple[str, int, int], int] = field(default_factory=dict)
    hashes: dict[tuple[str, int, int], Optional[int]] = field(default_factory=dict)
    decode_seconds: float = 0.0
    end_seen: bool = False

    def add_bucket(self, header: BucketHeader, data: memoryview,
                   resolve: Optional[Callable[[str], tuple[Optional[str], Optional[torch.Tensor]]]]) -> None:
        if header.version != self.version or header.session != self.session:
            raise WireFormatError(
                f"bucket {header.index} belongs to version {header.version}/session {header.session:x}, "
                f"expected version {self.version}/session {self.session:x}")
        if header.index in self.buckets:
            raise WireFormatError(f"bucket {header.index} of version {self.version} arrived twice")
        self.buckets[header.index] = (header, data)
        self.nbytes += header.total_len
        for e in header.entries:
            known = self.shapes.setdefault(e.name, (e.dtype, e.shape))
            if known != (e.dtype, e.shape):
                raise WireFormatError(f"tensor {e.name!r} announced with two different shapes/dtypes")
            self.coverage.setdefault(e.name, []).append((e.elem_start, e.elem_count))
            if e.elem_start == 0:
                self.manifest.add(e)
            if resolve is not None and e.name not in self.problems:
                local, target = resolve(e.name)
                if local is not None:
                    problem = entry_problem(e, target)
                    if problem:
                        self.problems[e.name] = problem

    def finalize(self, n_buckets: int, digest: str) -> None:
        """Raise unless the version is complete and consistent; then mark it complete."""
        if sorted(self.buckets) != list(range(n_buckets)):
            missing = sorted(set(range(n_buckets)) - set(self.buckets))
            raise WireFormatError(f"version {self.version}: buckets {missing[:10]} missing "
                                  f"({len(self.buckets)} of {n_buckets} arrived)")
        for name, ranges in self.coverage.items():
            numel = math.prod(self.shapes[name][1])
            pos = 0
            for start, count in sorted(ranges):
                if start != pos:
                    raise WireFormatError(f"tensor {name!r}: elements [{pos}, {start}) missing or overlapping")
                pos += count
            if pos != numel:
                raise WireFormatError(f"tensor {name!r}: {pos} of {numel} elements arrived")
        if self.manifest.digest() != digest:
            raise WireFormatError(f"version {self.version}: manifest digest mismatch")
        if self.problems:
            raise ManifestMismatchError(self.problems)
        self.complete = True

    def entry_tensor(self, header: BucketHeader, data: memoryview, e: Entry) -> torch.Tensor:
        """The elements of one entry: its private (decoded or copied) tensor, else the bucket bytes."""
        private = self.private.get((e.name, e.elem_start, e.elem_count))
        if private is not None:
            return private
        if e.encoding != ENC_DENSE:
            raise WireFormatError(f"tensor {e.name!r}: encoded entry was never decoded")
        return payload_tensor(data, header, e)

    def entries(self) -> Iterator[tuple[BucketHeader, memoryview, Entry]]:
        for index in sorted(self.buckets):
            header, data = self.buckets[index]
            for e in header.entries:
                yield header, data, e

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors in send order: zero-copy views where possible, assembled where split."""
        partial: dict[str, tuple[torch.Tensor, int]] = {}
        for header, data, e in self.entries():
            if e.is_whole:
                yield e.name, self.entry_tensor(header, data, e).view(e.shape) if e.elem_count else \
                    torch.empty(e.shape, dtype=e.dtype)
                continue
            buf, done = partial.get(e.name, (None, 0))
            src = self.entry_tensor(header, data, e)
            if buf is None:
                buf = torch.empty(e.numel, dtype=e.dtype, device=src.device)
            buf[e.elem_start:e.elem_start + e.elem_count].copy_(src)
            done += e.elem_count
            if done == e.numel:
                partial.pop(e.name, None)
                yield e.name, buf.view(e.shape)
            else:
                partial[e.name] = (buf, done)
