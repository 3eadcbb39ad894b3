"""Publish from checkpoint shards (safetensors) read into device memory, with GPUDirect Storage if present.

``CheckpointReader(path, device="cuda")`` is a publish source: it yields ``(name, tensor)`` for every
tensor of a ``.safetensors`` file or of every such file in a directory, with the tensors already on
``device``. A trainer that restarts, or a service that pushes a saved checkpoint to an inference
fleet, passes it to :meth:`WeightPublisher.publish`; on the ``cuda_ipc`` transport the tensors are
then assembled into device buckets on the GPU without touching host memory again.

How each shard's data section reaches the device:

- ``HOTWEIGHTS_USE_GDS=1`` with CuPy and KvikIO installed and a CUDA device: KvikIO reads the file
  straight into one device buffer per shard (``kvikio.CuFile.read``: GPUDirect Storage where the
  driver and file system support it; otherwise KvikIO's own compatibility mode, which it reports and
  this reader logs);
- otherwise: the data section is read into (pinned, when CUDA is there) host memory and copied to the
  device -- "CPU assembly plus H2D" -- and the reason GDS was not used is logged once.

The safetensors header is parsed from untrusted bytes: its length, JSON, every dtype, shape and data
offset are checked against the file before anything is read, and problems raise
:class:`~hotweights_trainer.errors.WireFormatError` naming the file and tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..config import SyncConfig
from ..errors import WireFormatError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 << 20

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(path: Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """(data section offset, name -> (dtype, shape, begin, end)) of a safetensors file, validated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WireFormatError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise WireFormatError(f"{path}: header length {n} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise WireFormatError(f"{path}: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireFormatError(f"{path}: header is not a JSON object")
    data_len = size - 8 - n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict):
            raise WireFormatError(f"{where}: entry is not an object")
        dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec.get("dtype"), str) else None
        if dtype is None:
            raise WireFormatError(f"{where}: unsupported dtype {spec.get('dtype')!r}")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise WireFormatError(f"{where}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise WireFormatError(f"{where}: data_offsets {offsets!r} outside the {data_len}-byte data section")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise WireFormatError(f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        out[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    return 8 + n, out


def gds_unavailable_reason(device: torch.device, use_gds: bool) -> Optional[str]:
    """Why GPUDirect Storage cannot be used here, or None when it can."""
    if not use_gds:
        return "HOTWEIGHTS_USE_GDS is off"
    if device.type != "cuda":
        return f"the target device {device} is not a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'hotweights_trainer[gpu]')"
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return "KvikIO is not installed (pip install kvikio-cu12)"
    return None


class CheckpointReader:
    """A publish source over safetensors shards, read into ``device`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cuda",
                 config: Optional[SyncConfig] = None, use_gds: Optional[bool] = None):
        root = Path(path)
        self.files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        if not self.files:
            raise WireFormatError(f"{root}: no .safetensors files")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        cfg = config if config is not None else SyncConfig.from_env()
        why = gds_unavailable_reason(self.device, cfg.use_gds if use_gds is None else use_gds)
        self.mode = "host" if why else "gds"
        self.reason = why or "KvikIO reads the shards into device memory"
        if self.mode == "gds":  # pragma: no cover - needs CuPy, KvikIO and a GPU
            import kvikio.defaults

            compat = getattr(kvikio.defaults, "compat_mode", lambda: None)()
            if compat:
                self.reason += f" (KvikIO compatibility mode {compat}: no GPUDirect path, POSIX reads inside KvikIO)"
            log.info("checkpoint %s: %s", root, self.reason)
        else:
            level = logging.INFO if "is off" in self.reason else logging.WARNING
            log.log(level, "checkpoint %s: CPU assembly plus host-to-device copy onto %s (%s)", root, self.device,
                    self.reason)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            start, entries = read_header(path)
            data_len = max((e[3] for e in entries.values()), default=0)
            data = self._read_gds(path, start, data_len) if self.mode == "gds" else self._read_host(path, start, data_len)
            self.bytes_read += data_len
            for name, (dtype, shape, b, e) in entries.items():
                raw = data[b:e]
                itemsize = torch.empty((), dtype=dtype).element_size()
                if b % itemsize:
                    raw = raw.clone()  # a misaligned tensor: torch views need itemsize alignment
                yield name, raw.view(dtype).view(shape)

    def _read_host(self, path: Path, start: int, length: int) -> torch.Tensor:
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        host = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        with open(path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(host.numpy())) if length else 0
        if got != length:
            raise WireFormatError(f"{path}: read {got} of {length} data bytes")
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=pin)

    def _read_gds(self, path: Path, start: int, length: int) -> torch.Tensor:  # pragma: no cover - needs a GPU
        import cupy
        import kvikio

        buf = torch.empty(length, dtype=torch.uint8, device=self.device)
        if length:
            with kvikio.CuFile(str(path), "r") as f:
                got = f.read(cupy.asarray(buf), size=length, file_offset=start)
            if got != length:
                raise WireFormatError(f"{path}: GDS read {got} of {length} data bytes")
        return buf


__all__ = ["CheckpointReader", "read_header", "gds_unavailable_reason", "DTYPES"]
