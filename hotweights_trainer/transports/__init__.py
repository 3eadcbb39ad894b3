"""Transports: one module per transport, all behind the contract in :mod:`.base`.

Modules are imported lazily, so a transport whose library is missing costs nothing until chosen.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ..config import SyncConfig
from ..errors import ConfigError, TransportUnavailableError
from .base import PublisherTransport, ReceiverTransport
from .endpoint import Endpoint, parse_endpoint

log = logging.getLogger(__name__)

# name -> (module, publisher class, receiver class)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "shm": ("hotweights_trainer.transports.shm", "ShmPublisher", "ShmReceiver"),
    "torch": ("hotweights_trainer.transports.torchdist", "TorchPublisher", "TorchReceiver"),
    "mpi": ("hotweights_trainer.transports.mpi", "MpiPublisher", "MpiReceiver"),
    "ucx": ("hotweights_trainer.transports.ucx", "UcxPublisher", "UcxReceiver"),
    "cuda_ipc": ("hotweights_trainer.transports.cuda_ipc", "CudaIpcPublisher", "CudaIpcReceiver"),
}

# Which endpoint schemes each transport accepts.
SCHEMES: dict[str, tuple[str, ...]] = {
    "shm": ("shm",),
    "torch": ("tcp",),
    "mpi": ("mpi",),
    "ucx": ("tcp",),
    "cuda_ipc": ("shm",),
}


def resolve(endpoint: Endpoint, config: SyncConfig, *, role: str) -> str:
    """The transport name to use for ``endpoint``; logs every input of an ``auto`` decision."""
    return _resolve(endpoint, config, role=role)[0]


def _resolve(endpoint: Endpoint, config: SyncConfig, *, role: str) -> tuple[str, Endpoint]:
    name = config.transport
    if name == "auto":
        from .select import auto_select, shm_endpoint_for

        name = auto_select(endpoint, config, role=role)
        if name in ("shm", "cuda_ipc"):
            endpoint = shm_endpoint_for(endpoint)  # a loopback tcp:// endpoint means "this host"
    if name not in REGISTRY:
        raise TransportUnavailableError(
            f"transport {name!r} is not available in this build; available: {', '.join(sorted(REGISTRY))}")
    if endpoint.scheme not in SCHEMES[name]:
        raise ConfigError(
            f"transport {name!r} cannot use endpoint {endpoint} (it takes "
            f"{', '.join(s + '://' for s in SCHEMES[name])})")
    return name, endpoint


def _load(name: str, index: int) -> Any:
    module, *classes = REGISTRY[name]
    return getattr(importlib.import_module(module), classes[index])


def publisher_class(name: str) -> type:
    """The publisher transport class of ``name`` (imports its module)."""
    return _load(name, 0)


def _reclaim_dead_blocks() -> None:
    # Every hotweights process that starts frees the shared memory of dead ones (SIGKILL and
    # os._exit run no code of ours), whatever endpoint and transport it uses itself.
    from .shm_blocks import reclaim_dead_blocks

    reclaim_dead_blocks()


def create_publisher_transport(endpoint: Endpoint, config: SyncConfig) -> PublisherTransport:
    _reclaim_dead_blocks()
    name, endpoint = _resolve(endpoint, config, role="publisher")
    return _load(name, 0)(endpoint, config)


def create_receiver_transport(endpoint: Endpoint, config: SyncConfig) -> ReceiverTransport:
    _reclaim_dead_blocks()
    name, endpoint = _resolve(endpoint, config, role="receiver")
    return _load(name, 1)(endpoint, config)


__all__ = ["REGISTRY", "SCHEMES", "resolve", "publisher_class", "create_publisher_transport", "create_receiver_transport",
           "parse_endpoint", "Endpoint"]
