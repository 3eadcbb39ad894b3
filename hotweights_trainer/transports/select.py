"""``transport="auto"``: choose a transport from the endpoint and the environment, and say why."""

from __future__ import annotations

import logging

from ..config import SyncConfig
from ..errors import EndpointError
from .endpoint import Endpoint

log = logging.getLogger(__name__)


def auto_select(endpoint: Endpoint, config: SyncConfig, *, role: str) -> str:
    inputs = {"endpoint_scheme": endpoint.scheme, "role": role}
    if endpoint.scheme == "shm":
        choice = "shm"
    else:
        raise EndpointError(f"no transport in this build serves {endpoint}; use shm://NAME")
    log.info("transport auto-selection: %s -> %s", ", ".join(f"{k}={v}" for k, v in inputs.items()), choice)
    return choice
