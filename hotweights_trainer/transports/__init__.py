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
}

# Which endpoint schemes each transport accepts.
SCHEMES: dict[str, tuple[str, ...]] = {
    "shm": ("shm",),
}


def resolve(endpoint: Endpoint, config: SyncConfig, *, role: str) -> str:
    """The transport name to use for ``endpoint``; logs every input of an ``auto`` decision."""
    name = config.transport
    if name == "auto":
        from .select import auto_select

        name = auto_select(endpoint, config, role=role)
    if name not in REGISTRY:
        raise TransportUnavailableError(
            f"transport {name!r} is not available in this build; available: {', '.join(sorted(REGISTRY))}")
    if endpoint.scheme not in SCHEMES[name]:
        raise ConfigError(
            f"transport {name!r} cannot use endpoint {endpoint} (it takes "
            f"{', '.join(s + '://' for s in SCHEMES[name])})")
    return name


def _load(name: str, index: int) -> Any:
    module, *classes = REGISTRY[name]
    return getattr(importlib.import_module(module), classes[index])


def create_publisher_transport(endpoint: Endpoint, config: SyncConfig) -> PublisherTransport:
    name = resolve(endpoint, config, role="publisher")
    return _load(name, 0)(endpoint, config)


def create_receiver_transport(endpoint: Endpoint, config: SyncConfig) -> ReceiverTransport:
    name = resolve(endpoint, config, role="receiver")
    return _load(name, 1)(endpoint, config)


__all__ = ["REGISTRY", "SCHEMES", "resolve", "create_publisher_transport", "create_receiver_transport",
           "parse_endpoint", "Endpoint"]
