"""TCP plumbing shared by the cross-host transports (torch, ucx): listen, connect, field checks.

The publisher listens on the endpoint's ``tcp://HOST:PORT`` for the framed JSON control channel of
:mod:`.control_channel`; receivers connect there. Port 0 binds a free port: the transport binds in
its constructor, so the publisher knows the real endpoint before anything keyed by it (status
socket, coordinator, metrics) starts. Transport-private control messages use the ``tx``
op; :func:`field` validates each of their fields before anything trusts it.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Optional

from ..errors import EndpointError, WireFormatError
from .endpoint import Endpoint

WILDCARDS = ("0.0.0.0", "::", "*")


def listen(endpoint: Endpoint) -> socket.socket:
    """A listening socket on the endpoint's host and port (EndpointError if it is taken; port 0: a
    free one, which ``bound(sock, endpoint)`` reports)."""
    host = "0.0.0.0" if endpoint.host == "*" else endpoint.host
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, endpoint.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EndpointError(f"{endpoint}: port {endpoint.port} is in use (another publisher already serves "
                                "it, or another program); pick another port") from None
        raise EndpointError(f"{endpoint}: cannot listen there: {exc}") from None
    sock.listen(128)
    return sock


def bound(sock: socket.socket, endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with the port ``sock`` is bound to (differs for port 0)."""
    port = sock.getsockname()[1]
    return endpoint if port == endpoint.port else endpoint.with_port(port)


def connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def local_address(sock: socket.socket) -> str:
    """The address this side of ``sock`` has: routable from the peer, by construction."""
    return sock.getsockname()[0]


def field(msg: dict[str, Any], name: str, tp: type, *, minimum: Optional[int] = None,
          maximum: Optional[int] = None) -> Any:
    """``msg[name]`` checked for type and range; WireFormatError naming the problem otherwise."""
    value = msg.get(name)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise WireFormatError(f"{msg.get('op')}/{msg.get('kind', '')}: field {name!r} must be {tp.__name__}, "
                              f"got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise WireFormatError(f"{msg.get('op')}/{msg.get('kind', '')}: field {name!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise WireFormatError(f"{msg.get('op')}/{msg.get('kind', '')}: field {name!r} must be <= {maximum}")
    return value


MAX_BUCKET_BYTES = 1 << 40
"""Largest bucket length a receiver accepts from a peer (a sanity bound, not a tuning knob)."""

MAX_CHUNKS = 1 << 20
"""Most chunks one bucket may be split into."""


def bucket_geometry(msg: dict[str, Any]) -> tuple[int, int]:
    """(length, chunk) of a ``bucket`` message, validated; the chunk count stays bounded."""
    length = field(msg, "length", int, minimum=1, maximum=MAX_BUCKET_BYTES)
    chunk = field(msg, "chunk", int, minimum=1, maximum=MAX_BUCKET_BYTES)
    if -(-length // chunk) > MAX_CHUNKS:
        raise WireFormatError(f"bucket of {length} bytes in chunks of {chunk} exceeds {MAX_CHUNKS} chunks")
    return length, chunk


def chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, size) of each chunk of a ``length``-byte bucket."""
    return [(off, min(chunk, length - off)) for off in range(0, length, chunk)]


__all__ = ["listen", "bound", "connect", "local_address", "field", "bucket_geometry", "chunks",
           "MAX_BUCKET_BYTES"]
