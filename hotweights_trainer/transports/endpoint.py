"""Endpoint strings: where publisher and receivers meet.

- ``shm://NAME``       same host; shared memory for bytes, a local socket for control (the default)
- ``tcp://HOST:PORT``  rendezvous for the cross-host transports (torch, ucx); a publisher given
  port 0 binds a free port and reports the endpoint with it (``WeightPublisher.endpoint``)
- ``mpi://``           the MPI world this process was started in (rank 0 publishes)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import EndpointError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    raw: str
    name: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None

    def __str__(self) -> str:
        return self.raw

    def with_port(self, port: int) -> "Endpoint":
        """This tcp:// endpoint on ``port`` (the one a publisher bound for port 0)."""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return Endpoint("tcp", f"tcp://{host}:{port}", host=self.host, port=port)


def connectable(endpoint: Endpoint) -> Endpoint:
    """``endpoint``, unless it is a tcp:// endpoint with port 0, which only a publisher can take."""
    if endpoint.scheme == "tcp" and endpoint.port == 0:
        raise EndpointError(f"endpoint {endpoint}: port 0 asks a publisher to bind a free port; give "
                            "receivers the port it bound (WeightPublisher.endpoint, or its status)")
    return endpoint


def parse_endpoint(text: "str | Endpoint") -> Endpoint:
    if isinstance(text, Endpoint):
        return text
    if not isinstance(text, str):
        raise EndpointError(f"endpoint must be a string like shm://NAME, got {type(text).__name__}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise EndpointError(f"endpoint {text!r} has no scheme; use shm://NAME, tcp://HOST:PORT or mpi://")
    if scheme == "shm":
        if not _NAME.match(rest):
            raise EndpointError(
                f"endpoint {text!r}: NAME must be 1-100 characters of letters, digits, '_', '.', '-' "
                "and not start with '.' or '-'")
        return Endpoint("shm", text, name=rest)
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise EndpointError(f"endpoint {text!r}: expected tcp://HOST:PORT with a port in 0..65535 "
                                "(0: the publisher binds a free one)")
        return Endpoint("tcp", text, host=host, port=int(port))
    if scheme == "mpi":
        if rest not in ("", "world"):
            raise EndpointError(f"endpoint {text!r}: use mpi:// (the whole MPI world)")
        return Endpoint("mpi", text, name="world")
    raise EndpointError(f"endpoint {text!r}: unknown scheme {scheme!r}; use shm://, tcp:// or mpi://")
