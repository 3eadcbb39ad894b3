"""A local, read-only status socket per publisher, so ``hotweights status`` works with the embedded backend.

The publisher listens on an abstract Unix socket named after its endpoint (Linux; a socket file in
the temp directory elsewhere). A client sends one ``{"op": "status"}`` frame and gets one
``{"op": "status", "status": {...}}`` frame back. Nothing on it can change state, so it needs no token;
it is reachable only from this host.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from ..errors import EndpointError, HotweightsError, PeerLostError, SyncTimeoutError, WireFormatError
from ..wire import messages

log = logging.getLogger(__name__)


def status_address(fleet: str) -> str:
    tag = hashlib.sha1(fleet.encode()).hexdigest()[:16]
    if sys.platform.startswith("linux"):
        return f"\0hotweights-status/{tag}"
    return os.path.join(tempfile.gettempdir(), f"hotweights-status-{tag}.sock")


def _check(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict) or msg.get("op") != "status":
        raise WireFormatError("status socket: expected an object with op 'status'")
    if "status" in msg and not isinstance(msg["status"], dict):
        raise WireFormatError("status socket: status must be an object")
    return msg


class StatusListener:
    def __init__(self, fleet: str, provider: Callable[[], dict[str, Any]], timeout_s: float):
        self.fleet = fleet
        self._provider = provider
        self._timeout = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._address = status_address(fleet)
        try:
            self._sock.bind(self._address)
        except OSError as exc:
            self._sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise EndpointError(f"another publisher already serves {fleet} on this host; use another "
                                    "name or close it") from None
            raise HotweightsError(f"cannot open the status socket of {fleet}: {exc}") from None
        self._sock.listen(8)
        self._sock.settimeout(0.5)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hotweights-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            try:
                self._answer(conn)
            except (HotweightsError, OSError) as exc:
                log.info("status request on %s failed: %s", self.fleet, exc)
            finally:
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        reader = messages.FrameReader(1 << 16, _check)
        conn.settimeout(min(self._timeout, 5.0))
        deadline = time.monotonic() + min(self._timeout, 5.0)
        while time.monotonic() < deadline:
            data = conn.recv(4096)
            if not data:
                return
            if reader.feed(data):
                messages.send(conn, {"op": "status", "status": self._provider()}, self._timeout)
                return

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() below at once
        except OSError:
            pass  # not listening any more
        try:
            self._sock.close()
        except OSError:
            pass  # already closed
        if not self._address.startswith("\0"):
            try:
                os.unlink(self._address)
            except FileNotFoundError:
                pass  # never created or already removed
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)


def query_status(fleet: str, timeout_s: float, max_bytes: int = 64 << 20) -> dict[str, Any]:
    """Ask the publisher of ``fleet`` on this host for its status."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(status_address(fleet))
        except OSError as exc:
            raise PeerLostError(f"no publisher of {fleet} on this host answers ({exc})") from None
        messages.send(sock, {"op": "status"}, timeout_s)
        reader = messages.FrameReader(max_bytes, _check)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                break
            if not data:
                raise PeerLostError(f"publisher of {fleet} closed the status connection")
            for msg in reader.feed(data):
                if "status" in msg:
                    return msg["status"]
        raise SyncTimeoutError(f"publisher of {fleet} did not answer the status request within "
                               f"{timeout_s:.1f}s")
    finally:
        sock.close()


__all__ = ["StatusListener", "query_status", "status_address"]
