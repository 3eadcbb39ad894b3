"""What connects the GPUs of this node, from real signals, and how copies use those paths.

:func:`probe` asks torch which device pairs have peer access (``torch.cuda.can_device_access_peer``)
and, when the NVIDIA management library is importable and answers (``pynvml``, package
``nvidia-ml-py``), which pairs are joined by NVLink. Devices are matched to NVML by UUID, so
``CUDA_VISIBLE_DEVICES`` renumbering cannot mix them up. Without a CUDA device it returns an empty
topology that says why.

:class:`PathUsage` counts the chunk assignments of every copy this process runs per path
(``"cuda:0->cuda:1"``, ``"cpu->cuda:0"``) and publishes each path's share of them as
``hotweights_ipc_path_utilization{path=...}``: a path's share of 1.0 means every chunk went that way.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import metrics

log = logging.getLogger(__name__)

LINKS = ("same", "nvlink", "p2p", "host")
"""How bytes move from one device to another: the same device, NVLink, PCIe peer-to-peer, or staged
through host memory (no peer access)."""


@dataclass(frozen=True)
class Topology:
    devices: int
    peer: tuple[tuple[bool, ...], ...]
    """``peer[i][j]``: device i can read and write device j's memory directly."""
    nvlink: Optional[tuple[tuple[bool, ...], ...]] = None
    """``nvlink[i][j]``: NVML reports an NVLink path between i and j; None when NVML is unavailable."""
    source: str = ""
    """Which signals were read, or why none were."""

    def link(self, src: int, dst: int) -> str:
        """One of :data:`LINKS` for a copy from device ``src`` to device ``dst``."""
        if src == dst:
            return "same"
        if not (0 <= src < self.devices and 0 <= dst < self.devices):
            return "host"
        if self.nvlink is not None and self.nvlink[src][dst]:
            return "nvlink"
        return "p2p" if self.peer[src][dst] else "host"

    def describe(self) -> dict:
        return {"devices": self.devices, "peer": [list(r) for r in self.peer],
                "nvlink": None if self.nvlink is None else [list(r) for r in self.nvlink], "source": self.source}


def from_matrices(peer: Sequence[Sequence[bool]], nvlink: Optional[Sequence[Sequence[bool]]] = None,
                  source: str = "given") -> Topology:
    """A topology from explicit matrices (validated square, same size)."""
    n = len(peer)
    if any(len(r) != n for r in peer) or (nvlink is not None and (len(nvlink) != n or any(len(r) != n for r in nvlink))):
        raise ValueError("peer and nvlink matrices must be square and of the same size")
    return Topology(n, tuple(tuple(bool(x) for x in r) for r in peer),
                    None if nvlink is None else tuple(tuple(bool(x) for x in r) for r in nvlink), source)


_cached: Optional[Topology] = None
_cache_lock = threading.Lock()


def probe(refresh: bool = False) -> Topology:
    """The topology of the visible CUDA devices (cached per process)."""
    global _cached
    with _cache_lock:
        if _cached is not None and not refresh:
            return _cached
        _cached = _probe()
        log.info("GPU topology: %d device(s), %s", _cached.devices, _cached.source)
        return _cached


def _probe() -> Topology:
    if not torch.cuda.is_available():
        return Topology(0, (), None, "no CUDA device visible")
    n = torch.cuda.device_count()
    peer = tuple(tuple(i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(n)) for i in range(n))
    nvlink, why = _nvml_nvlink(n)
    source = "peer access from torch.cuda; " + ("NVLink from NVML" if nvlink is not None else f"no NVLink data ({why})")
    return Topology(n, peer, nvlink, source)


def device_uuid(index: int) -> Optional[str]:
    """The UUID of a visible CUDA device as NVML and nvidia-smi print it (``GPU-...``), if torch knows it."""
    try:
        raw = str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return None
    return raw if raw.startswith("GPU-") else f"GPU-{raw}"


def _nvml_nvlink(n: int) -> tuple[Optional[tuple[tuple[bool, ...], ...]], str]:
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure just means "no NVLink signal"; said in the log
        return None, f"NVML did not initialise: {exc}"
    try:
        by_uuid = {}
        for k in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(k)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            by_uuid[uuid.decode() if isinstance(uuid, bytes) else uuid] = h
        handles = []
        for i in range(n):
            uuid = device_uuid(i)
            if uuid is None or uuid not in by_uuid:
                return None, f"device {i} has no UUID NVML knows"
            handles.append(by_uuid[uuid])
        caps = pynvml.NVML_P2P_CAPS_INDEX_NVLINK
        ok = pynvml.NVML_P2P_STATUS_OK
        matrix = tuple(tuple(i != j and pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], caps) == ok
                             for j in range(n)) for i in range(n))
        return matrix, ""
    except Exception as exc:  # noqa: BLE001 - an NVML query that fails leaves the peer-access signal only
        return None, f"NVML query failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a library that half-failed; nothing to recover
            pass


def device_label(t: torch.Tensor) -> str:
    """``"cpu"`` or ``"cuda:N"`` (always with an index) for a tensor's device."""
    d = t.device
    if d.type == "cpu":
        return "cpu"
    return f"{d.type}:{d.index if d.index is not None else torch.cuda.current_device()}"


class PathUsage:
    """Chunk assignments per copy path of one endpoint, exported as shares."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, path: str, pieces: int = 1) -> None:
        if pieces <= 0:
            return
        with self._lock:
            self.counts[path] = self.counts.get(path, 0) + pieces
            total = sum(self.counts.values())
            shares = {p: c / total for p, c in self.counts.items()}
        for p, share in shares.items():
            metrics.IPC_PATH_UTILIZATION.labels(self.endpoint, p).set(share)

    def shares(self) -> dict[str, float]:
        with self._lock:
            total = sum(self.counts.values())
            return {p: c / total for p, c in self.counts.items()} if total else {}


__all__ = ["Topology", "LINKS", "probe", "from_matrices", "device_uuid", "device_label", "PathUsage"]
