"""The GPU stand-in of the cuda_ipc tests: bucket memory in shared host files instead of CUDA IPC.

Everything else of the transport -- control protocol, exports per receiver, acks, the in-flight
window, handle TTLs, digests, staged copies, the device-side scatter code path -- runs unchanged; only
"allocate / export / open device memory" is swapped for files mapped with
``torch.UntypedStorage.from_file(shared=True)``. ``install(directory)`` makes the transport use it in
this process (the publisher side in a test, or a receiver process).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch

from hotweights_trainer.errors import WireFormatError
from hotweights_trainer.gpu.memory import IpcMemory

_seq = itertools.count(1)


class HostIpcMemory(IpcMemory):
    kind = "host"

    def __init__(self, directory: str):
        self.device = torch.device("cpu")
        self.directory = directory
        self.paths: dict[int, str] = {}
        self.exports = 0
        self.released: list[dict[str, Any]] = []
        self.opened = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        path = os.path.join(self.directory, f"hwt-ipc.{os.getpid()}.{next(_seq)}")
        storage = torch.UntypedStorage.from_file(path, True, nbytes)
        t = torch.empty((0,), dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
        self.paths[t.data_ptr()] = path
        return t

    def export(self, tensor: torch.Tensor) -> dict[str, Any]:
        self.exports += 1
        return {"kind": self.kind, "path": self.paths[tensor.data_ptr()], "nbytes": tensor.numel()}

    def open(self, export: Any) -> torch.Tensor:
        if not isinstance(export, dict) or export.get("kind") != self.kind:
            raise WireFormatError("IPC export is not a host test export")
        path, nbytes = export.get("path"), export.get("nbytes")
        if not isinstance(path, str) or os.path.dirname(path) != self.directory or not isinstance(nbytes, int):
            raise WireFormatError(f"IPC export names a file outside {self.directory}")
        self.opened += 1
        storage = torch.UntypedStorage.from_file(path, True, nbytes)
        return torch.empty((0,), dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))

    def release_export(self, export: dict[str, Any]) -> None:
        self.released.append(export)


def install(directory: str) -> HostIpcMemory:
    """Make every cuda_ipc transport created in this process use one HostIpcMemory; returns it."""
    from hotweights_trainer.transports import cuda_ipc

    memory = HostIpcMemory(directory)
    cuda_ipc.memory_factory = lambda: memory
    return memory
