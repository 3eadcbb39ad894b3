"""Control messages: length-prefixed JSON frames with a size limit and a schema per operation.

Frame: ``u32 little-endian length`` + that many bytes of UTF-8 JSON holding one object with an
``op`` field. Nothing is pickled; :func:`validate` checks every field's type before the engine reads it.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Callable

from ..errors import PeerLostError, SyncTimeoutError, WireFormatError

_LEN = struct.Struct("<I")

# op -> {field: type}. Extra fields are allowed (forward compatibility) but never trusted unchecked.
SCHEMAS: dict[str, dict[str, Any]] = {
    # publisher -> receiver
    "welcome": {"session": int, "pid": int, "version": int},
    "begin": {"version": int, "session": int},
    "bucket": {"version": int, "index": int, "handle": str, "offset": int, "length": int},
    "end": {"version": int, "n_buckets": int, "digest": str, "n_tensors": int},
    "commit": {"version": int},
    "abort": {"version": int, "reason": str},
    "drop": {"handles": list},
    "refused": {"reason": str},
    # receiver -> publisher
    "hello": {"receiver_id": str, "pid": int, "live_version": int},
    "staged": {"version": int},
    "nack": {"version": int, "error": str, "message": str},
    "release": {"version": int},
    # the commit of this version is pending in the receiver (or already live): publish() returns
    # only after every ready receiver said so, so a poll() right after it applies the version
    "committed": {"version": int},
    "heartbeat": {"live_version": int},
    # receiver -> publisher, delta sync: dense copies of [name, elem_start, elem_count] ranges whose
    # delta this receiver cannot apply (no or another base version, checksum mismatch after patching)
    "resync": {"version": int, "ranges": list},
    # either direction: transport-private (group formation, goodbyes); the transport validates the rest
    "tx": {"kind": str},
}


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode("utf-8")
    return _LEN.pack(len(body)) + body


def decode(body: bytes, check: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireFormatError(f"control message is not valid JSON: {exc}") from None
    return (check or validate)(msg)


def validate(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise WireFormatError(f"control message must be an object, got {type(msg).__name__}")
    op = msg.get("op")
    schema = SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise WireFormatError(f"unknown control message op {op!r}")
    for key, tp in schema.items():
        value = msg.get(key)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise WireFormatError(f"control message {op!r}: field {key!r} must be {tp.__name__}")
        if tp is int and value < 0:
            raise WireFormatError(f"control message {op!r}: field {key!r} must be >= 0")
    return msg


class FrameReader:
    """Incremental reader of frames from a non-blocking or blocking socket."""

    def __init__(self, max_bytes: int, check: Callable[[Any], dict[str, Any]] | None = None):
        self.max_bytes = max_bytes
        self._check = check  # another protocol's schema check (the coordinator RPC); default: SCHEMAS
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf, 0)
            if n > self.max_bytes:
                raise WireFormatError(f"control message of {n} bytes exceeds the {self.max_bytes} limit")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size:_LEN.size + n])
            del self._buf[:_LEN.size + n]
            out.append(decode(body, self._check))
        return out


def send(sock: socket.socket, msg: dict[str, Any], timeout: float) -> None:
    """Send one frame with a deadline; a stuck or dead peer raises instead of blocking forever."""
    data = encode(msg)
    try:
        sock.settimeout(timeout)  # inside: a socket closed by another thread (a dropped peer) is a lost peer
        sock.sendall(data)
    except socket.timeout:
        raise SyncTimeoutError(f"peer did not accept a {msg.get('op')!r} message within {timeout:.1f}s") from None
    except OSError as exc:
        raise PeerLostError(f"peer went away while sending {msg.get('op')!r}: {exc}") from None
