"""A framed control channel over stream sockets (Unix or TCP), used by transports for their commit protocol.

``ControlServer`` runs on the publisher: one thread accepts receivers and reads their frames. For
each it first runs the transport's own control hooks (``admit``, ``on_transport_message`` for
``op: tx`` frames, ``forget``, ``housekeep``; see :mod:`.base`), then puts the engine's event
(``events.on_join`` / ``on_message`` / ``on_lost`` / ``on_tick``, which only enqueue). A hook that
raises is reported with ``events.on_error``, so it fails the version in flight instead of vanishing
in a log. ``ControlClient`` runs on a receiver: one thread connects (and reconnects, with backoff,
until closed), sends the hello and hands every frame to the transport; a frame handler that raises
is reported through ``on_error``. Frames are the JSON messages of
:mod:`hotweights_trainer.wire.messages`; every socket operation has a deadline.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable, Optional, Sequence

from ..errors import HotweightsError, PeerLostError, SyncTimeoutError, WireFormatError
from ..wire import messages
from .base import TICK_S, PublisherHandler, PublisherTransport, ReceiverTransport

log = logging.getLogger(__name__)


class _Conn:
    __slots__ = ("sock", "reader", "rid", "lock", "peer")

    def __init__(self, sock: socket.socket, max_bytes: int, peer: str):
        self.sock = sock
        self.reader = messages.FrameReader(max_bytes)
        self.rid: Optional[str] = None
        self.lock = threading.Lock()
        self.peer = peer


class ControlServer:
    """Publisher side: accept receivers, dispatch their frames, send frames with a deadline."""

    def __init__(self, listener: socket.socket, *, transport: PublisherTransport, events: PublisherHandler,
                 timeout_s: float, max_message_bytes: int, name: str):
        self._listener = listener
        self._tx = transport
        self._events = events
        self._timeout = timeout_s
        self._max = max_message_bytes
        self._sel = selectors.DefaultSelector()
        self._conns: dict[str, _Conn] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name=f"hotweights-ctl-{name}", daemon=True)

    def start(self) -> None:
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()

    @property
    def receivers(self) -> list[str]:
        with self._lock:
            return list(self._conns)

    def send(self, rid: str, msg: dict[str, Any]) -> bool:
        with self._lock:
            conn = self._conns.get(rid)
        if conn is None:
            return False
        try:
            with conn.lock:
                messages.send(conn.sock, msg, self._timeout)
            return True
        except (SyncTimeoutError, PeerLostError) as exc:
            log.warning("receiver %s: %s; disconnecting it", rid, exc)
            self.drop(rid, str(exc))
            return False

    def drop(self, rid: str, reason: str) -> None:
        with self._lock:
            conn = self._conns.get(rid)
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer; the selector thread finishes the cleanup
            self._wake()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._timeout)
        for conn in list(self._conns.values()):
            _close_quietly(conn.sock)
        self._conns.clear()
        _close_quietly(self._listener)
        _close_quietly(self._wake_r)
        _close_quietly(self._wake_w)

    # ---------------------------------------------------------------- selector thread
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closing: the loop exits anyway

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK_S
        while not self._closed.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass  # spurious wakeup
                else:
                    self._read(key.data)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self._hook("housekeep", self._tx.housekeep)
                self._events.on_tick()
        self._sel.close()

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        sock.settimeout(self._timeout)
        conn = _Conn(sock, self._max, str(addr) or "local")
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, socket.timeout):
            return
        except OSError as exc:
            self._lost(conn, f"connection error: {exc}")
            return
        if not data:
            self._lost(conn, "connection closed")
            return
        try:
            frames = conn.reader.feed(data)
        except WireFormatError as exc:
            log.warning("receiver %s sent a malformed control message (%s); disconnecting it",
                        conn.rid or conn.peer, exc)
            self._lost(conn, f"malformed message: {exc}")
            return
        for msg in frames:
            if conn.rid is None:
                if msg["op"] != "hello":
                    self._lost(conn, f"first message was {msg['op']!r}, expected 'hello'")
                    return
                rid = msg["receiver_id"]
                with self._lock:
                    if rid in self._conns:
                        rid = f"{rid}#{id(conn):x}"
                    conn.rid = rid
                    self._conns[rid] = conn
                admitted = self._hook(f"admit({rid})", self._tx.admit, rid, msg)
                if admitted:
                    self._events.on_join(rid, msg)
                elif admitted is None:  # the hook raised: nobody else will let this receiver go
                    self.drop(rid, "the publisher's transport failed to admit it")
            elif msg["op"] == "tx":
                self._hook(f"on_transport_message({conn.rid})", self._tx.on_transport_message, conn.rid, msg)
            else:
                self._events.on_message(conn.rid, msg)

    def _lost(self, conn: _Conn, reason: str) -> None:
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass  # never registered or already gone
        _close_quietly(conn.sock)
        if conn.rid is not None:
            with self._lock:
                self._conns.pop(conn.rid, None)
            self._hook(f"forget({conn.rid})", self._tx.forget, conn.rid)
            self._events.on_lost(conn.rid, reason)

    def _hook(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        # The selector thread must outlive a bug in a hook (every receiver would hang), and the bug
        # must reach the engine, which fails the version in flight with it.
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the engine as a Failed event
            self._events.on_error(exc, f"the {self._tx.name} transport's {what} on its control thread")
            return None


class ControlClient:
    """Receiver side: connect with retries, send hello, deliver frames, reconnect after a loss."""

    def __init__(self, connect: Callable[[], socket.socket], *, hello: Callable[[], dict[str, Any]],
                 on_connected: Callable[[], None], on_frame: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[str], None], on_error: Callable[[BaseException, str], None],
                 timeout_s: float, max_message_bytes: int, name: str):
        self._connect = connect
        self._on_error = on_error
        self._hello = hello
        self._on_connected = on_connected
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._timeout = timeout_s
        self._max = max_message_bytes
        self._sock: Optional[socket.socket] = None
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hotweights-rx-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, msg: dict[str, Any]) -> None:
        sock = self._sock
        if sock is None:
            raise PeerLostError("not connected to the publisher")
        with self._send_lock:
            messages.send(sock, msg, self._timeout)

    def close(self) -> None:
        self._closed.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # peer already gone
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._timeout)

    def _run(self) -> None:
        delay = 0.02
        attempts = 0
        while not self._closed.is_set():
            try:
                sock = self._connect()
            except OSError as exc:
                attempts += 1
                if attempts == 1 or attempts % 50 == 0:
                    log.info("publisher not reachable yet (%s); retrying", exc)
                self._closed.wait(delay)
                delay = min(delay * 1.5, 0.5)
                continue
            delay, attempts = 0.02, 0
            reason = self._serve(sock)
            if not self._closed.is_set():
                log.info("lost the publisher: %s; reconnecting", reason)

    def _serve(self, sock: socket.socket) -> str:
        reader = messages.FrameReader(self._max)
        sock.settimeout(self._timeout)
        try:
            messages.send(sock, self._hello(), self._timeout)
        except HotweightsError as exc:
            _close_quietly(sock)
            return str(exc)
        self._sock = sock
        reason = "closed"
        try:
            self._on_connected()
            sock.settimeout(TICK_S * 2)
            while not self._closed.is_set():
                try:
                    data = sock.recv(1 << 16)
                except socket.timeout:
                    continue
                except OSError as exc:
                    reason = f"connection error: {exc}"
                    break
                if not data:
                    reason = "publisher closed the connection"
                    break
                try:
                    frames = reader.feed(data)
                except WireFormatError as exc:
                    reason = f"malformed message from publisher: {exc}"
                    log.warning("%s", reason)
                    break
                for msg in frames:
                    try:
                        self._on_frame(msg)
                    except Exception as exc:  # noqa: BLE001 - reported to the engine; the connection lives on
                        self._on_error(exc, f"handling {msg.get('op')!r} from the publisher")
        finally:
            self._sock = None
            _close_quietly(sock)
            self._on_lost(reason)
        return reason


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass  # closing twice is harmless


class ServedPublisher(PublisherTransport):
    """Publisher transports whose control messages go through the :class:`ControlServer` they start
    (``self._server``: set in ``start``, ``None`` before and after ``close``)."""

    _server: Optional[ControlServer] = None

    def send(self, to: Sequence[str], msg: dict[str, Any]) -> list[str]:
        server = self._server
        if server is None:
            return list(to)
        return [rid for rid in to if not server.send(rid, msg)]

    def drop(self, rid: str, reason: str) -> None:
        if self._server is not None:
            self._server.drop(rid, reason)


class ClientReceiver(ReceiverTransport):
    """Receiver transports that reach their publisher through a :class:`ControlClient`
    (``self._client``: set in ``start``, ``None`` after ``close``)."""

    _client: Optional[ControlClient] = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def send(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "release":
            self.release_staged(msg["version"])
        if self._client is None:
            raise PeerLostError("receiver transport not started")
        self._client.send(msg)

    def release_staged(self, version: int) -> None:
        """The engine is done with ``version``: free the buffers this transport staged it in."""
