"""Device memory that another process on the node can open: CUDA IPC through torch.

``CudaIpcMemory`` allocates bucket buffers with torch's caching allocator and exports them with
torch's own CUDA tensor sharing (``UntypedStorage._share_cuda_``, the mechanism behind
``torch.multiprocessing``): an export is the CUDA IPC memory handle of the allocation, the buffer's
offset in it, and a reference-counter slot in a small shared file. The export travels as JSON (bytes
as hex), never pickled; a receiver opens it with ``UntypedStorage._new_shared_cuda``, which maps the
allocation once per process and hands out a tensor over it.

Lifetime, as torch implements it: every export holds a counter slot set to 1; the consumer's tensor
decrements it when it is freed. A producer buffer that is freed while a counter is still above 0 is
parked ("limbo") instead of returned to the allocator, so a consumer can never read memory that was
reused for something else; ``torch.cuda.ipc_collect()`` frees parked buffers whose counters reached 0.
A consumer that dies never decrements: the transport calls :meth:`CudaIpcMemory.release_export` for
the exports of a receiver whose process is gone, so its buffers can be freed (nothing leaks).

Exporting a storage a second time wraps it once more, and the IPC event torch records at export time
is not re-recorded when the buffer is refilled. The transport therefore exports a buffer once per
(buffer, receiver), and orders writes and reads itself: the publisher synchronises after packing
before it posts, a receiver synchronises after copying before it acks.

Devices are matched by UUID, not index, so processes with different ``CUDA_VISIBLE_DEVICES`` agree.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Optional

import torch

from ..errors import TransportUnavailableError, WireFormatError
from .topology import device_uuid

log = logging.getLogger(__name__)

_MAX_HANDLE_BYTES = 4096


class IpcMemory(abc.ABC):
    """Allocate, export and open bucket memory shared between processes of one node."""

    kind: str = "?"
    device: torch.device

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor of ``nbytes`` that can be exported."""

    @abc.abstractmethod
    def export(self, tensor: torch.Tensor) -> dict[str, Any]:
        """A JSON-able description another process can open (one per consumer)."""

    @abc.abstractmethod
    def open(self, export: Any) -> torch.Tensor:
        """The consumer side: a uint8 tensor over the exporter's memory (validates ``export``)."""

    def release_export(self, export: dict[str, Any]) -> None:
        """The consumer of ``export`` died without closing it: drop its reference."""

    def collect(self) -> None:
        """Free exported buffers nobody references any more."""

    def synchronize(self) -> None:
        """Wait until work queued on this memory's device is complete."""


def _field(d: dict, key: str, tp: type, *, minimum: Optional[int] = None) -> Any:
    value = d.get(key)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise WireFormatError(f"IPC export: field {key!r} must be {tp.__name__}")
    if minimum is not None and value < minimum:
        raise WireFormatError(f"IPC export: field {key!r} must be >= {minimum}")
    return value


def _hex(d: dict, key: str, *, allow_empty: bool = False) -> bytes:
    text = _field(d, key, str)
    if len(text) > 2 * _MAX_HANDLE_BYTES or (not text and not allow_empty):
        raise WireFormatError(f"IPC export: field {key!r} has a bad length")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise WireFormatError(f"IPC export: field {key!r} is not hex") from None


class CudaIpcMemory(IpcMemory):  # pragma: no cover - every method needs a CUDA device
    kind = "cuda"

    def __init__(self, device: Optional[int] = None):
        if not torch.cuda.is_available():
            raise TransportUnavailableError(
                "the cuda_ipc transport needs a CUDA device, and torch.cuda.is_available() is False in this "
                "process; use HOTWEIGHTS_TRANSPORT=shm (or auto) on machines without one")
        index = torch.cuda.current_device() if device is None else int(device)
        self.device = torch.device("cuda", index)
        self.uuid = device_uuid(index) or ""

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def export(self, tensor: torch.Tensor) -> dict[str, Any]:
        storage = tensor.untyped_storage()
        with torch.cuda.device(self.device):
            device, handle, size, offset, rc, rc_offset, event, event_sync = storage._share_cuda_()
        return {"kind": self.kind, "device": int(device), "uuid": self.uuid, "handle": bytes(handle).hex(),
                "size": int(size), "offset": int(offset), "rc": bytes(rc).hex(), "rc_offset": int(rc_offset),
                "event": bytes(event or b"").hex(), "event_sync": bool(event_sync),
                "storage_offset": int(tensor.storage_offset()), "nbytes": int(tensor.numel())}

    def _local_index(self, uuid: str, index: int) -> int:
        if uuid:
            for i in range(torch.cuda.device_count()):
                if device_uuid(i) == uuid:
                    return i
            raise TransportUnavailableError(
                f"the publisher's GPU {uuid} is not visible in this process; make it visible "
                "(CUDA_VISIBLE_DEVICES) to open its CUDA IPC handles")
        if index >= torch.cuda.device_count():
            raise TransportUnavailableError(f"the publisher's GPU {index} is not visible in this process")
        return index

    def open(self, export: Any) -> torch.Tensor:
        if not isinstance(export, dict) or export.get("kind") != self.kind:
            raise WireFormatError("IPC export is not a CUDA IPC export (does the publisher use another transport?)")
        device = _field(export, "device", int, minimum=0)
        uuid = _field(export, "uuid", str)
        size = _field(export, "size", int, minimum=1)
        offset = _field(export, "offset", int, minimum=0)
        rc_offset = _field(export, "rc_offset", int, minimum=0)
        event_sync = _field(export, "event_sync", bool)
        storage_offset = _field(export, "storage_offset", int, minimum=0)
        nbytes = _field(export, "nbytes", int, minimum=1)
        if storage_offset + nbytes > size:
            raise WireFormatError(f"IPC export: {storage_offset}+{nbytes} bytes exceed the {size}-byte storage")
        handle, rc, event = _hex(export, "handle"), _hex(export, "rc"), _hex(export, "event", allow_empty=True)
        index = self._local_index(uuid, device)
        torch.cuda.init()
        storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, rc, rc_offset, event, event_sync)
        t = torch.empty((0,), dtype=torch.uint8, device=torch.device("cuda", index))
        return t.set_(storage, storage_offset, (nbytes,), (1,))

    def release_export(self, export: dict[str, Any]) -> None:
        try:
            torch.UntypedStorage._release_ipc_counter(bytes.fromhex(export["rc"]), export["rc_offset"],
                                                      device=self.device)
        except (RuntimeError, KeyError, ValueError) as exc:
            log.debug("releasing an IPC counter failed (already gone?): %s", exc)

    def collect(self) -> None:
        torch.cuda.ipc_collect()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def default_memory(device: Optional[int] = None) -> IpcMemory:
    """The memory the ``cuda_ipc`` transport uses unless it is given another."""
    return CudaIpcMemory(device)


__all__ = ["IpcMemory", "CudaIpcMemory", "default_memory"]
