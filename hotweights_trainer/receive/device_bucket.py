"""A received bucket whose payload is in device memory, and how the receiver engine decodes it.

Transports that keep buckets on the GPU hand the engine a :class:`DeviceBucket` instead of a
``memoryview``. Two kinds:

- **device-digested** (CUDA IPC): the header arrived as host bytes in the control message, the
  payload was copied device-to-device into the receiver's own staged buffer and digested there
  (:mod:`.checksum`); the header carries ``FLAG_DEVICE`` and the publisher's device digest.
- **host-verified** (the broadcast path on NCCL): the whole bucket was received into device memory
  and also copied to the host; it is verified with xxh3 on that host copy exactly like a host bucket,
  and the device copy is what gets applied.

Either way the engine stages it like any bucket, and applying a version made of device buckets runs
:func:`.scatter.apply_device` on the GPU instead of host copies.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import CorruptBucketError, WireFormatError
from ..wire.bucket import FLAG_DEVICE, BucketHeader, Entry, decode_bucket, decode_header
from ..gpu.checksum import payload_digest


class DeviceBucket:
    """Header plus device-resident payload of one received bucket."""

    __slots__ = ("device", "header_bytes", "digest", "host", "scatter")

    def __init__(self, device: torch.Tensor, *, header_bytes: Optional[bytes] = None, digest: Optional[int] = None,
                 host: Optional[memoryview] = None, scatter: Any = None):
        if (header_bytes is None) == (host is None):
            raise ValueError("a DeviceBucket has either header bytes (device digest) or a host copy (xxh3)")
        if device.dtype != torch.uint8 or device.dim() != 1:
            raise ValueError("DeviceBucket memory must be a 1-D uint8 tensor")
        self.device = device
        self.header_bytes = header_bytes
        self.digest = digest
        self.host = host
        self.scatter = scatter

    def __len__(self) -> int:
        if self.host is not None:
            return len(self.host)
        return len(self.header_bytes) + self.device.numel()

    def decode(self, *, max_header_bytes: int) -> BucketHeader:
        """Validate header and payload (raises WireFormatError / CorruptBucketError)."""
        if self.host is not None:
            header = decode_bucket(self.host, max_header_bytes=max_header_bytes)
            if self.device.numel() < header.total_len:
                raise WireFormatError(f"bucket {header.index}: device copy holds {self.device.numel()} of "
                                      f"{header.total_len} bytes")
            return header
        header = decode_header(memoryview(self.header_bytes), max_header_bytes=max_header_bytes, payload_inline=False)
        if not header.flags & FLAG_DEVICE:
            raise WireFormatError(f"bucket {header.index} of version {header.version} arrived as a device bucket "
                                  "but its header has no device digest")
        if self.device.numel() < header.payload_len:
            raise WireFormatError(f"truncated device bucket {header.index}: {self.device.numel()} payload bytes "
                                  f"present, header says {header.payload_len}")
        got = self.digest if self.digest is not None else payload_digest(self.device[:header.payload_len])
        if got != header.payload_xxh3:
            raise CorruptBucketError(
                f"bucket {header.index} of version {header.version}: device payload digest mismatch "
                f"({got:016x} != {header.payload_xxh3:016x}); the bucket was rejected")
        return header

    def entry(self, header: BucketHeader, e: Entry) -> torch.Tensor:
        """Zero-copy device view of one entry's elements."""
        base = header.header_len if self.host is not None else 0
        start = base + e.payload_off
        return self.device[start:start + e.payload_nbytes].view(e.dtype)


def is_device_bucket(data: Any) -> bool:
    return isinstance(data, DeviceBucket)


def decode_received(data: Any, *, max_header_bytes: int) -> BucketHeader:
    """What the receiver engine runs on every bucket: host or device, fully verified."""
    if isinstance(data, DeviceBucket):
        return data.decode(max_header_bytes=max_header_bytes)
    return decode_bucket(data, max_header_bytes=max_header_bytes)


__all__ = ["DeviceBucket", "decode_received", "is_device_bucket"]
