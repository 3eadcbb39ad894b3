"""Client of ``hotweights coord serve``: one request at a time, with failover across coordinators.

``coord_endpoint`` may list several coordinators (``tcp://a:7788,tcp://b:7788``) that share one Redis.
A call goes to the last one that answered; on a connection error, a timeout or a ``NotLeaderError``
it moves on (to the leader the refusal named, when it names one) with a short backoff, until
``timeout_s`` has passed. Retried calls are safe: every coordinator method is idempotent or, like
``begin``, harmless to repeat (a repeated begin supersedes the first one, which nobody staged).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from typing import Any, Optional

from ..errors import (ConfigError, CoordinatorError, EndpointError, NotLeaderError, PeerLostError,
                      SyncTimeoutError, WireFormatError)
from ..transports.endpoint import connectable, parse_endpoint
from ..wire import messages
from . import rpc

log = logging.getLogger(__name__)


def parse_endpoints(text: Optional[str]) -> list[tuple[str, int]]:
    """``tcp://h:p[,tcp://h:p...]`` -> [(host, port), ...]."""
    if not text:
        raise ConfigError("coord_endpoint (HOTWEIGHTS_COORD_ENDPOINT) is required for coord_backend=tcp")
    out = []
    for part in text.split(","):
        ep = connectable(parse_endpoint(part.strip()))
        if ep.scheme != "tcp":
            raise EndpointError(f"coordinator endpoint {part.strip()!r} must be tcp://HOST:PORT")
        out.append((ep.host, ep.port))
    return out


class CoordClient:
    def __init__(self, endpoints: list[tuple[str, int]], *, token: Optional[str], timeout_s: float,
                 max_message_bytes: int):
        if not endpoints:
            raise ConfigError("no coordinator endpoint given")
        self.endpoints = list(endpoints)
        self._token = token
        self._timeout = timeout_s
        self._max = max_message_bytes
        self._index = 0
        self._sock: Optional[socket.socket] = None
        self._reader: Optional[messages.FrameReader] = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _describe(self, i: int) -> str:
        host, port = self.endpoints[i]
        return f"tcp://{host}:{port}"

    def _connect(self, left: float) -> socket.socket:
        host, port = self.endpoints[self._index]
        sock = socket.create_connection((host, port), timeout=max(min(left, 2.0), 0.05))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = messages.FrameReader(self._max, rpc.check_reply)
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass  # already closed
            self._sock = None

    def _switch(self, leader: Optional[str]) -> None:
        self._drop()
        if leader:
            for i in range(len(self.endpoints)):
                if self._describe(i) == leader:
                    self._index = i
                    return
        self._index = (self._index + 1) % len(self.endpoints)

    def call(self, fleet: str, method: str, args: dict[str, Any]) -> Any:
        with self._lock:
            return self._call(fleet, method, args)

    def _call(self, fleet: str, method: str, args: dict[str, Any]) -> Any:
        deadline = time.monotonic() + self._timeout
        delay = 0.02
        last = "no attempt"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                tried = ", ".join(self._describe(i) for i in range(len(self.endpoints)))
                raise CoordinatorError(f"no coordinator of {tried} answered {method} for {fleet} within "
                                       f"{self._timeout:.1f}s (last: {last})")
            try:
                if self._sock is None:
                    self._sock = self._connect(left)
                msg = {"op": "call", "id": next(self._ids), "fleet": fleet, "method": method, "args": args}
                if self._token is not None:
                    msg["token"] = self._token
                messages.send(self._sock, msg, max(left, 0.05))
                reply = self._read(msg["id"], deadline)
            except (OSError, PeerLostError, SyncTimeoutError, WireFormatError) as exc:
                last = f"{self._describe(self._index)}: {exc}"
                log.info("coordinator %s failed (%s); trying the next one", self._describe(self._index), exc)
                self._switch(None)
                time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
                delay = min(delay * 2, 0.25)
                continue
            if reply["ok"]:
                return reply.get("result")
            if reply["error_type"] == "NotLeaderError":
                last = f"{self._describe(self._index)}: not the leader ({reply.get('leader')})"
                log.info("coordinator %s is not the leader of %s (leader: %s); retrying",
                         self._describe(self._index), fleet, reply.get("leader"))
                self._switch(reply.get("leader") if isinstance(reply.get("leader"), str) else None)
                time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
                delay = min(delay * 2, 0.25)
                continue
            rpc.raise_reply(reply)

    def _read(self, want: int, deadline: float) -> dict[str, Any]:
        assert self._sock is not None and self._reader is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncTimeoutError("coordinator did not reply in time")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                raise SyncTimeoutError("coordinator did not reply in time") from None
            if not data:
                raise PeerLostError("coordinator closed the connection")
            for reply in self._reader.feed(data):
                if reply["id"] == want:
                    return reply

    def close(self) -> None:
        with self._lock:
            self._drop()


__all__ = ["CoordClient", "parse_endpoints", "NotLeaderError"]
