"""A framed control channel over stream sockets (Unix or TCP), used by transports for their commit protocol.

``ControlServer`` runs on the publisher: one thread accepts receivers, reads their frames and calls
the publisher handler. ``ControlClient`` runs on a receiver: one thread connects (and reconnects,
with backoff, until closed), sends the hello and hands every frame to the transport. Frames are the
JSON messages of :mod:`hotweights_trainer.wire.messages`; every socket operation has a deadline.
"""

from __future__ import annotations

import collections
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

    def __init__(self, listener: socket.socket, *, handler: PublisherHandler, timeout_s: float,
                 max_message_bytes: int, name: str):
        self._listener = listener
        self._handler = handler
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
                self._call(self._handler.on_tick)
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
                self._call(self._handler.on_join, rid, msg)
            else:
                self._call(self._handler.on_message, conn.rid, msg)

    def _lost(self, conn: _Conn, reason: str) -> None:
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass  # never registered or already gone
        _close_quietly(conn.sock)
        if conn.rid is not None:
            with self._lock:
                self._conns.pop(conn.rid, None)
            self._call(self._handler.on_lost, conn.rid, reason)

    def _call(self, fn: Callable, *args: Any) -> None:
        # The selector thread must survive a bug in one callback, or every receiver would hang.
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - logged with traceback; the loop keeps serving
            log.exception("publisher handler %s failed", getattr(fn, "__name__", fn))


class ControlClient:
    """Receiver side: connect with retries, send hello, deliver frames, reconnect after a loss."""

    def __init__(self, connect: Callable[[], socket.socket], *, hello: Callable[[], dict[str, Any]],
                 on_connected: Callable[[], None], on_frame: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[str], None], timeout_s: float, max_message_bytes: int, name: str):
        self._connect = connect
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
                    except Exception:  # noqa: BLE001 - a handler bug must not kill the connection thread
                        log.exception("receiver handler failed on %r", msg.get("op"))
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

    def _on_tx_message(self, rid: str, msg: dict[str, Any]) -> None:
        """A transport message from a receiver (``op: tx``); none by default, so ignored."""

    def _on_tick(self) -> None:
        """Periodic transport bookkeeping on the control thread (nothing by default)."""


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


class ServedHooks:
    """Between the control server and the engine of a :class:`ServedPublisher`: the transport's own
    bookkeeping first (``tx._on_join`` may refuse a receiver; ``tx._on_tx_message`` takes the
    transport messages, ``op: tx``; ``tx._on_lost``, ``tx._on_tick``), then the engine."""

    def __init__(self, tx: Any, engine: PublisherHandler):
        self._tx = tx
        self._engine = engine

    def on_join(self, rid: str, hello: dict[str, Any]) -> None:
        if self._tx._on_join(rid, hello):
            self._call(self._engine.on_join, rid, hello)

    def on_message(self, rid: str, msg: dict[str, Any]) -> None:
        if msg["op"] == "tx":
            self._tx._on_tx_message(rid, msg)
        else:
            self._call(self._engine.on_message, rid, msg)

    def on_lost(self, rid: str, reason: str) -> None:
        self._tx._on_lost(rid)
        self._call(self._engine.on_lost, rid, reason)

    def on_tick(self) -> None:
        self._tx._on_tick()
        self._call(self._engine.on_tick)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)

    def stop(self, timeout: float) -> None:
        """Nothing runs beside the control thread here."""


class DispatchedHooks(ServedHooks):
    """:class:`ServedHooks` whose engine callbacks run, in arrival order, on a dispatcher thread.

    For transports whose ``post`` waits, under the engine's lock, for something that messages read
    on the control thread release (acks freeing window slots): the control thread then never calls
    into the engine itself, while the transport's own bookkeeping still runs inline.
    """

    def __init__(self, tx: Any, engine: PublisherHandler, name: str):
        super().__init__(tx, engine)
        self._queue: collections.deque[tuple[Callable[..., None], tuple]] = collections.deque()
        self._cond = threading.Condition()
        self._tick_queued = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"hotweights-engine-{name}", daemon=True)
        self._thread.start()

    def on_tick(self) -> None:
        self._tx._on_tick()
        with self._cond:
            if self._tick_queued:
                return  # the engine is busy; one pending tick is enough
            self._tick_queued = True
        self._call(self._tick)

    def _tick(self) -> None:
        with self._cond:
            self._tick_queued = False
        self._engine.on_tick()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with self._cond:
            if self._stopped:
                return
            self._queue.append((fn, args))
            self._cond.notify()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait(0.5)
                if not self._queue:
                    return
                fn, args = self._queue.popleft()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - logged with traceback; the dispatcher must keep serving
                log.exception("publisher handler %s failed", getattr(fn, "__name__", fn))
