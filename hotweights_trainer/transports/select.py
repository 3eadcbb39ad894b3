"""``transport="auto"``: choose a transport from the endpoint and the environment, and say why.

Rules, first match wins (:func:`decide`, pure and unit tested):

1. same host -- an ``shm://NAME`` endpoint, or ``tcp://`` to a loopback address (every peer is then
   on this host by construction) -- gives ``cuda_ipc`` when CUDA is available and that transport is
   in this build, otherwise ``shm``;
2. ``mpi://``, or a process started by ``mpirun``/``mpiexec`` with an ``mpi://`` endpoint, gives ``mpi``;
3. UCX importable (ucx-py or ucxx) and the endpoint cross-host gives ``ucx``;
4. otherwise ``torch``.

Both sides apply the same rules to the same endpoint, so they agree without talking; where an
input can differ between hosts (UCX installed on one only), the hello carries the transport name
and a publisher rejects a receiver that chose differently, naming both choices.
Every input and the result are logged at INFO.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import socket
from dataclasses import asdict, dataclass
from typing import Optional

from ..config import SyncConfig, launcher_facts
from ..errors import EndpointError
from .endpoint import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    endpoint_scheme: str
    role: str
    loopback: bool
    mpi_launcher: Optional[str]
    ucx_module: Optional[str]
    cuda_available: bool
    cuda_ipc_in_build: bool


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def ucx_module() -> Optional[str]:
    """``ucp`` (ucx-py) when importable, else ``ucxx``, else None."""
    for name in ("ucp", "ucxx"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install just means "no CUDA" for this decision
        return False


def gather(endpoint: Endpoint, role: str) -> Inputs:
    from . import REGISTRY

    return Inputs(endpoint_scheme=endpoint.scheme, role=role,
                  loopback=endpoint.scheme == "tcp" and is_loopback(endpoint.host),
                  mpi_launcher=launcher_facts()["mpi_launcher"], ucx_module=ucx_module(),
                  cuda_available=_cuda_available(), cuda_ipc_in_build="cuda_ipc" in REGISTRY)


def decide(inputs: Inputs) -> tuple[str, str]:
    """(transport, reason) for the given inputs."""
    if inputs.endpoint_scheme == "shm" or inputs.loopback:
        where = "shm:// endpoint" if inputs.endpoint_scheme == "shm" else "loopback tcp:// endpoint"
        if inputs.cuda_available and inputs.cuda_ipc_in_build:
            return "cuda_ipc", f"same host ({where}) and CUDA available"
        return "shm", f"same host ({where})"
    if inputs.endpoint_scheme == "mpi":
        launched = f"launched by mpirun ({inputs.mpi_launcher})" if inputs.mpi_launcher else \
            "not launched by an MPI launcher: a world of one process"
        return "mpi", f"mpi:// endpoint, {launched}"
    if inputs.endpoint_scheme == "tcp":
        if inputs.ucx_module:
            return "ucx", f"cross-host tcp:// endpoint and UCX importable ({inputs.ucx_module})"
        return "torch", "cross-host tcp:// endpoint, UCX not importable"
    raise EndpointError(f"no transport serves the {inputs.endpoint_scheme}:// scheme")


def auto_select(endpoint: Endpoint, config: SyncConfig, *, role: str) -> str:
    inputs = gather(endpoint, role)
    choice, reason = decide(inputs)
    log.info("transport auto-selection: %s -> %s (%s)",
             ", ".join(f"{k}={v}" for k, v in asdict(inputs).items()), choice, reason)
    return choice


def shm_endpoint_for(endpoint: Endpoint) -> Endpoint:
    """The shm:// endpoint a loopback tcp:// endpoint maps to (same on every process of the host)."""
    if endpoint.scheme == "shm":
        return endpoint
    return Endpoint("shm", f"shm://tcp-{endpoint.port}", name=f"tcp-{endpoint.port}")


__all__ = ["Inputs", "decide", "gather", "auto_select", "is_loopback", "ucx_module", "shm_endpoint_for"]
