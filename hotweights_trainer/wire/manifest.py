"""Manifest: the ordered list of tensors (name, dtype, shape) in one version, and its digest.

Publisher and receiver build it independently (the publisher from what it packs, the receiver from
the bucket headers it verified) and compare digests, so a receiver never commits a version whose
shape differs from what the publisher meant to send.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xxhash

from .bucket import Entry
from .dtypes import dtype_name


@dataclass
class ManifestBuilder:
    _hash: "xxhash.xxh3_128" = field(default_factory=xxhash.xxh3_128)
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        """Record a tensor the first time one of its entries is seen."""
        if entry.name in self.tensors:
            return
        self.tensors[entry.name] = (entry.dtype, entry.shape)
        self._hash.update(f"{entry.name}\0{dtype_name(entry.dtype)}\0{entry.shape}\n".encode())

    def digest(self) -> str:
        return self._hash.hexdigest()

    def __len__(self) -> int:
        return len(self.tensors)
