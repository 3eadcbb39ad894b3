"""``hotweights coord serve``: a standalone coordinator for publishers on other hosts (``coord_backend=tcp``).

One :class:`~.coordinator.Coordinator` per fleet, created on the first request naming it. With a
Redis URL the state lives in Redis and each fleet is led by whichever server holds its lease; the
others answer ``NotLeaderError`` naming the leader, and take over once its lease expires (the leader
was killed) or is released (it shut down). Without Redis the state lives in this process only.

Security: binds loopback unless told otherwise, and refuses a non-loopback bind without a
``coord_token``. Every mutating request must carry that token (constant-time compare); refusals are
answered with ``AuthError``, logged and counted (``hotweights_refused_requests_total``). Requests
are size-limited JSON frames, schema-checked before use; nothing is unpickled.

A janitor thread sweeps the fleets this server leads: versions whose publisher vanished are aborted,
and handles of dead owners are freed once their TTL passed.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import threading
from typing import Any, Optional

from .. import metrics
from ..config import SyncConfig
from ..errors import AuthError, ConfigError, HotweightsError, NotLeaderError, WireFormatError
from ..transports.endpoint import parse_endpoint
from ..wire import messages
from . import rpc
from .coordinator import Coordinator
from .janitor import HOST, free_handles, owner_is_dead

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CoordServer:
    def __init__(self, endpoint: str, config: SyncConfig, *, redis_url: Optional[str] = None,
                 advertise: Optional[str] = None):
        # Port 0 asks the OS for a free port (tests, embedding); the endpoint parser rejects it elsewhere.
        ep = parse_endpoint(endpoint[:-2] + ":1" if endpoint.endswith(":0") else endpoint)
        if ep.scheme != "tcp":
            raise ConfigError(f"coord serve needs a tcp://HOST:PORT endpoint, got {endpoint}")
        port = 0 if endpoint.endswith(":0") else ep.port
        if not is_loopback(ep.host) and not config.coord_token:
            raise ConfigError(f"refusing to serve on non-loopback address {ep.host} without a token: set "
                              "HOTWEIGHTS_COORD_TOKEN (every mutating request must then carry it)")
        self.config = config
        self.redis_url = redis_url
        self._sock = socket.create_server((ep.host, port), reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"tcp://{ep.host}:{self.port}"
        self.advertise = advertise or self.endpoint
        self._fleets: dict[str, Coordinator] = {}
        self._fleets_lock = threading.Lock()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self.refused = 0
        self._threads = [
            threading.Thread(target=self._accept_loop, name="hotweights-coord-accept", daemon=True),
            threading.Thread(target=self._janitor_loop, name="hotweights-coord-janitor", daemon=True)]

    def start(self) -> "CoordServer":
        for t in self._threads:
            t.start()
        log.info("coordinator serving on %s (store %s%s)", self.endpoint,
                 "redis" if self.redis_url else "memory",
                 f", advertised as {self.advertise}" if self.advertise != self.endpoint else "")
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._closed.wait(timeout)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread so the port is free at once
        except OSError:
            pass  # not connected/listening any more
        if threading.current_thread() is not self._threads[0] and self._threads[0].is_alive():
            self._threads[0].join(timeout=2.0)
        try:
            self._sock.close()
        except OSError:
            pass  # already closed
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # peer gone
        with self._fleets_lock:
            fleets, self._fleets = dict(self._fleets), {}
        for coord in fleets.values():
            coord.close()  # releases leases so a standby takes over at once
        log.info("coordinator on %s stopped", self.endpoint)

    # ---------------------------------------------------------------- fleets
    def coordinator(self, fleet: str) -> Coordinator:
        with self._fleets_lock:
            if self._closed.is_set():
                # close() empties the table under this lock after setting _closed: a coordinator
                # created now would outlive the server and keep renewing its lease.
                raise NotLeaderError(f"coordinator {self.advertise} is shutting down")
            coord = self._fleets.get(fleet)
            if coord is None:
                store = None
                if self.redis_url:
                    from .redis_store import RedisStore

                    store = RedisStore(fleet, self.redis_url, lease_ms=self.config.coord_lease_ms,
                                       timeout_s=self.config.timeout_s,
                                       holder={"endpoint": self.advertise, "host": HOST, "pid": os.getpid()})
                coord = Coordinator(fleet, self.config, store)
                self._fleets[fleet] = coord
            return coord

    # ---------------------------------------------------------------- connections
    def _accept_loop(self) -> None:
        self._sock.settimeout(0.5)
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break  # listener closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True,
                             name="hotweights-coord-conn").start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        reader = messages.FrameReader(self.config.max_message_bytes, rpc.check_request)
        conn.settimeout(0.5)
        try:
            while not self._closed.is_set():
                try:
                    data = conn.recv(1 << 16)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    requests = reader.feed(data)
                except WireFormatError as exc:
                    self._refuse(None, "malformed")
                    log.warning("coordinator client %s sent a malformed request (%s); disconnecting it",
                                peer, exc)
                    return
                for req in requests:
                    messages.send(conn, self.handle(req, peer), self.config.timeout_s)
        except HotweightsError as exc:
            log.info("coordinator client %s: %s", peer, exc)
        finally:
            self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass  # already closed

    def _refuse(self, fleet: Optional[str], reason: str) -> None:
        self.refused += 1
        metrics.REFUSED.labels(fleet or "-", reason).inc()

    def handle(self, req: dict[str, Any], peer: str = "local") -> dict[str, Any]:
        """Answer one validated request (authenticates it first)."""
        rid, fleet, method = req["id"], req["fleet"], req["method"]
        if method not in rpc.READ_ONLY and self.config.coord_token is not None:
            given = req.get("token")
            expected = self.config.coord_token.encode()
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected):
                reason = "missing token" if given is None else "wrong token"
                self._refuse(fleet, reason)
                log.warning("refused %s for %s from %s: %s", method, fleet, peer, reason)
                return rpc.error_reply(rid, AuthError(f"{method} refused: {reason} (set "
                                                      "HOTWEIGHTS_COORD_TOKEN to the coordinator's token)"))
        try:
            result = self.coordinator(fleet).call(method, req["args"])
            if method == "status":
                result = {**result, "coordinator": self.advertise, "refused_requests": self.refused}
            return {"op": "reply", "id": rid, "ok": True, "result": result}
        except HotweightsError as exc:
            return rpc.error_reply(rid, exc)
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the server; logged
            log.exception("coordinator failed on %s for %s", method, fleet)
            return rpc.error_reply(rid, HotweightsError(f"internal coordinator error: "
                                                        f"{type(exc).__name__}: {exc}"))

    # ---------------------------------------------------------------- housekeeping
    def _janitor_loop(self) -> None:
        period = min(max(self.config.handle_ttl / 4, 0.1), 1.0)
        while not self._closed.wait(period):
            with self._fleets_lock:
                fleets = list(self._fleets.items())
            for fleet, coord in fleets:
                if not coord.store.holds_lease():
                    continue
                try:
                    expired = coord.op_janitor(owner_is_dead)
                    free_handles(fleet, expired, self.config)
                except HotweightsError as exc:
                    log.warning("janitor of %s: %s", fleet, exc)


__all__ = ["CoordServer", "is_loopback"]
