"""``ucx`` transport (``tcp://HOST:PORT``): buckets as tagged UCX messages, one stream per receiver.

- **Control**: the publisher listens on ``tcp://HOST:PORT`` with the framed JSON channel of
  :mod:`.control_channel`. Each receiver runs a UCX listener and puts its address (the local
  address of its control connection, so routable from the publisher) in its hello; the publisher
  connects a UCX endpoint to it before the engine sees the join (with ``ucx_retries`` retries).
- **Buckets**: for each receiver a ``bucket`` control message carries a base tag (a random per
  connection salt, a per-receiver sequence number), then the bucket goes as ``ucx_chunk_mb``
  chunks tagged base+k. Receivers post matching receives as soon as the control message arrives,
  into pre-faulted reused buffers, and hand buckets to the engine in order (:mod:`.delivery`).
- **Flow control**: per receiver at most ``ucx_concurrency`` chunk sends at once (0 = all chunks of
  the buckets admitted) and ``ucx_inflight_limit_mb`` bytes; across the transport the shared window
  and byte cap of :mod:`.window`. A send that fails is retried ``ucx_retries`` times,
  ``ucx_retry_delay_ms`` apart, on a fresh endpoint; then the receiver is evicted (the engine sees
  it lost) and the bucket's other receivers go on.
- **Bindings**: ucx-py (``ucp``) when importable, otherwise ucxx (:mod:`.ucx_backends`).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

from ..config import SyncConfig
from ..errors import EndpointError, PeerLostError, WireFormatError
from . import tcp
from .base import (BucketBuffer, PublisherHandler, ReceiverHandler, TransportStats)
from .buffers import HostBufferPool, ReceivePool, numpy_view
from .control_channel import ClientReceiver, ControlClient, ControlServer, ServedPublisher
from .delivery import EventPending, OrderedDelivery
from .endpoint import Endpoint
from .meter import TransportMeter
from .ucx_backends import create_backend
from .window import InflightWindow, WindowGate

log = logging.getLogger(__name__)

_SEQ_BITS = 24
_CHUNK_BITS = 20
_SALT_BITS = 64 - _SEQ_BITS - _CHUNK_BITS


def _check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.scheme != "tcp":
        raise EndpointError(f"the ucx transport needs a tcp://HOST:PORT endpoint, got {endpoint}")


@dataclass
class _Send:
    flight: "_Flight"
    arr: Any
    tag: int
    nbytes: int
    attempts: int = 0
    req: Any = None
    not_before: float = 0.0


@dataclass
class _Peer:
    rid: str
    host: str
    port: int
    ep: Any
    salt: int
    seq: int = 0
    queued: collections.deque = field(default_factory=collections.deque)
    active: list = field(default_factory=list)
    active_bytes: int = 0
    failed: Optional[str] = None


@dataclass
class _Flight:
    nbytes: int
    t0: float
    pending: EventPending
    settled: bool = False


class UcxPublisher(ServedPublisher):
    name: ClassVar[str] = "ucx"
    zero_copy: ClassVar[bool] = False
    multi_receiver: ClassVar[bool] = True
    cross_host: ClassVar[bool] = True
    addressable: ClassVar[bool] = True
    late_join: ClassVar[bool] = True
    pipelined: ClassVar[bool] = True
    survives_receiver_death: ClassVar[bool] = True
    limits: ClassVar[dict[str, str]] = {"zero_copy": "bytes are sent into each receiver's own buffer"}

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        super().__init__(endpoint, config)
        self._backend = create_backend(config, prefer=None if config.ucx_backend == "auto" else config.ucx_backend)
        self._pool = HostBufferPool(config.bucket_bytes)
        self._gate = WindowGate(InflightWindow.from_config(config), timeout_s=config.timeout_s,
                                name=f"ucx {endpoint}")
        self._meter = TransportMeter("ucx", str(endpoint), self._gate)
        self._chunk = config.ucx_chunk_mb << 20
        self._limit = config.ucx_inflight_limit_mb << 20
        self._peers: dict[str, _Peer] = {}
        self._graveyard: list[tuple[Any, list[Any]]] = []
        self._lock = threading.Condition()
        self._server: Optional[ControlServer] = None
        self._closed = False
        self._pump = threading.Thread(target=self._pump_run, name="hotweights-ucx-pump", daemon=True)

    def start(self, handler: PublisherHandler) -> None:
        sock = tcp.listen(self.endpoint)
        self._server = ControlServer(sock, transport=self, events=handler, timeout_s=self.config.timeout_s,
                                     max_message_bytes=self.config.max_message_bytes, name=str(self.endpoint.port))
        self._pump.start()
        self._server.start()
        log.info("ucx transport listening on %s (binding %s, chunk %d MiB, concurrency %s, limit %d MiB/receiver)",
                 self.endpoint, self._backend.name, self._chunk >> 20, self.config.ucx_concurrency or "auto",
                 self._limit >> 20)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._pump.join(self.config.timeout_s)
        for peer in list(self._peers.values()):
            self._backend.close_endpoint(peer.ep)
        self._backend.close()  # stops the progress thread; only then may dead endpoints go
        self._peers.clear()
        self._graveyard.clear()
        self._pool.clear()

    # ---------------------------------------------------------------- buckets
    def alloc(self, nbytes: int) -> BucketBuffer:
        buf = self._pool.get(nbytes)
        return BucketBuffer(mem=buf.mem, handle="ucx", capacity=buf.size, owner=buf)

    def post(self, to: Sequence[str], version: int, index: int, buf: BucketBuffer) -> None:
        with self._lock:
            peers = [self._peers[rid] for rid in sorted(to) if rid in self._peers]
        if not peers:
            return
        n = buf.length
        parts = tcp.chunks(n, self._chunk)
        self._gate.acquire(n)
        flight = _Flight(n, time.perf_counter(), EventPending())
        flight.pending = EventPending(len(parts) * len(peers), on_done=lambda _p: self._settle(flight))
        arr = numpy_view(buf.owner)
        for peer in peers:
            with self._lock:
                peer.seq = (peer.seq + 1) % (1 << _SEQ_BITS)
                base = (peer.salt << (_SEQ_BITS + _CHUNK_BITS)) | (peer.seq << _CHUNK_BITS)
            msg = {"op": "bucket", "version": version, "index": index, "handle": "ucx", "offset": 0, "length": n,
                   "chunk": self._chunk, "tag": base}
            if self.send([peer.rid], msg) or peer.failed:
                for _ in parts:
                    flight.pending.finish(PeerLostError(f"receiver {peer.rid} went away"))
                continue
            with self._lock:
                for k, (off, size) in enumerate(parts):
                    peer.queued.append(_Send(flight, arr[off:off + size], base + k, size))
                self._lock.notify_all()
        buf.owner.busy = lambda: not flight.pending.done()

    def _settle(self, flight: _Flight) -> None:
        if flight.settled:
            return
        flight.settled = True
        dt = time.perf_counter() - flight.t0
        if flight.pending.error() is None:
            self._meter.moved(flight.nbytes, dt)
        self._gate.release(flight.nbytes, dt)

    def recycle(self, buf: BucketBuffer) -> None:
        self._pool.put(buf.owner)

    def stats(self) -> TransportStats:
        self._meter.refresh()
        return self._meter.stats

    # ---------------------------------------------------------------- pump thread: issue and reap chunk sends
    def _pump_run(self) -> None:
        concurrency = self.config.ucx_concurrency
        while True:
            with self._lock:
                while not self._closed and not any(p.queued or p.active for p in self._peers.values()):
                    self._lock.wait(0.5)
                if self._closed:
                    break
                peers = list(self._peers.values())
            for peer in peers:
                with self._lock:  # forget() may fail the same peer from the control thread
                    try:
                        self._pump_peer(peer, concurrency)
                    except Exception as exc:  # noqa: BLE001 - one peer's failure must not stop the others
                        log.exception("ucx transport: sending to %s failed", peer.rid)
                        self._fail_peer(peer, f"send error: {exc}")
            time.sleep(1e-4)
        for peer in list(self._peers.values()):
            self._fail_peer(peer, "publisher closed")

    def _pump_peer(self, peer: _Peer, concurrency: int) -> None:
        now = time.monotonic()
        still = []
        for s in peer.active:
            if not self._backend.done(s.req):
                still.append(s)
                continue
            peer.active_bytes -= s.nbytes
            err = self._backend.error(s.req)
            if err is None:
                s.flight.pending.finish()
            elif s.attempts <= self.config.ucx_retries and not peer.failed:
                log.warning("ucx send of %d bytes to %s failed (%s); retry %d of %d", s.nbytes, peer.rid, err,
                            s.attempts, self.config.ucx_retries)
                self._meter.retried()
                s.not_before = now + self.config.ucx_retry_delay_ms / 1e3
                self._reconnect(peer)
                peer.queued.appendleft(s)
            else:
                s.flight.pending.finish(PeerLostError(f"sending to {peer.rid} failed: {err}"))
                self._fail_peer(peer, f"send failed after {self.config.ucx_retries} retries: {err}")
                return
        peer.active = still
        while peer.queued and not peer.failed:
            s = peer.queued[0]
            if concurrency and len(peer.active) >= concurrency:
                break
            if peer.active and peer.active_bytes + s.nbytes > self._limit:
                break
            if s.not_before > now:
                break
            peer.queued.popleft()
            s.attempts += 1
            s.req = self._backend.send(peer.ep, s.arr, s.tag)
            peer.active.append(s)
            peer.active_bytes += s.nbytes

    def _reconnect(self, peer: _Peer) -> None:
        if self._backend.alive(peer.ep):
            return
        try:
            old = peer.ep
            peer.ep = self._backend.connect(peer.host, peer.port, self.config.timeout_s)
            self._graveyard.append((old, []))  # released after the progress thread stops
        except Exception as exc:  # noqa: BLE001 - the retry that follows fails and is counted
            log.warning("reconnecting UCX to %s failed: %s", peer.rid, exc)

    def _fail_peer(self, peer: _Peer, reason: str) -> None:
        with self._lock:
            self._fail_peer_locked(peer, reason)

    def _fail_peer_locked(self, peer: _Peer, reason: str) -> None:
        if peer.failed:
            return
        peer.failed = reason
        err = PeerLostError(f"receiver {peer.rid}: {reason}")
        for s in list(peer.queued) + list(peer.active):
            s.flight.pending.finish(err)
        self._graveyard.append((peer.ep, [s.req for s in peer.active if s.req is not None]))
        peer.queued.clear()
        peer.active.clear()
        peer.active_bytes = 0
        quiet = reason in ("disconnected", "publisher closed")
        log.log(logging.INFO if quiet else logging.WARNING, "ucx transport: %s %s: %s",
                "closing stream to" if quiet else "evicting", peer.rid, reason)
        if not quiet:
            self.drop(peer.rid, reason)

    # ---------------------------------------------------------------- control hooks (control thread)
    def admit(self, rid: str, hello: dict[str, Any]) -> bool:
        tx = hello.get("tx") if isinstance(hello.get("tx"), dict) else {}
        chosen = tx.get("transport")
        if chosen != "ucx":
            log.error("receiver %s uses transport %r but this publisher uses ucx (set HOTWEIGHTS_TRANSPORT alike "
                      "on both sides); disconnecting it", rid, chosen)
            self.drop(rid, f"transport mismatch: receiver {chosen!r}, publisher 'ucx'")
            return False
        try:
            host = tcp.field(tx, "host", str)
            port = tcp.field(tx, "port", int, minimum=1, maximum=65535)
        except WireFormatError as exc:
            log.warning("receiver %s sent a bad ucx address (%s); disconnecting it", rid, exc)
            self.drop(rid, str(exc))
            return False
        ep, last = None, None
        for attempt in range(self.config.ucx_retries + 1):
            try:
                ep = self._backend.connect(host, port, self.config.timeout_s)
                break
            except Exception as exc:  # noqa: BLE001 - UCX raises its own types; retried, then reported
                last = exc
                self._meter.retried()
                log.info("UCX connect to %s (%s:%d) failed (%s); retry %d", rid, host, port, exc, attempt + 1)
                time.sleep(self.config.ucx_retry_delay_ms / 1e3)
        if ep is None:
            self.drop(rid, f"UCX connect to {host}:{port} failed: {last}")
            return False
        with self._lock:
            self._peers[rid] = _Peer(rid, host, port, ep, secrets.randbits(_SALT_BITS))
        return True

    def housekeep(self) -> None:
        self._meter.refresh()

    def forget(self, rid: str) -> None:
        with self._lock:
            peer = self._peers.pop(rid, None)
            if peer is not None:
                # Neither close the endpoint of a vanished peer nor drop requests still in flight on
                # it while UCX's progress thread may be failing them: ucxx can crash on that race.
                # They are released after the progress thread has stopped, in close().
                self._graveyard.append((peer.ep, [s.req for s in peer.active if s.req is not None]))
        if peer is not None:
            self._fail_peer(peer, "disconnected")


class _PolledPending:
    """All receives of one bucket; completion is polled (UCX requests have no callbacks here)."""

    def __init__(self, backend: Any, reqs: list[Any]):
        self._backend = backend
        self._reqs = reqs
        self._done = False

    def done(self) -> bool:
        if not self._done:
            self._done = all(self._backend.done(r) for r in self._reqs)
        return self._done

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(2e-4)
        return True

    def error(self) -> Optional[BaseException]:
        for r in self._reqs:
            err = self._backend.error(r)
            if err is not None:
                return err
        return None


class UcxReceiver(ClientReceiver):
    name: ClassVar[str] = "ucx"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        super().__init__(endpoint, config)
        self._backend = create_backend(config, prefer=None if config.ucx_backend == "auto" else config.ucx_backend)
        self._pool = ReceivePool(config.bucket_bytes)
        self._client: Optional[ControlClient] = None
        self._delivery: Optional[OrderedDelivery] = None
        self._port = 0
        self._local_ip: Optional[str] = None

    def start(self, handler: ReceiverHandler, hello: Callable[[], dict[str, Any]]) -> None:
        self._port = self._backend.listen()
        self._delivery = OrderedDelivery(handler, timeout_s=self.config.timeout_s, name=f"ucx-{self.endpoint.port}")
        delivery = self._delivery

        def connect():
            sock = tcp.connect(self.endpoint, self.config.timeout_s)
            self._local_ip = tcp.local_address(sock)
            return sock

        def full_hello() -> dict[str, Any]:
            return {**hello(), "tx": {"transport": "ucx", "host": self._local_ip, "port": self._port,
                                      "binding": self._backend.name}}

        self._client = ControlClient(
            connect, hello=full_hello, on_connected=lambda: delivery.connected({}), on_frame=self._on_frame,
            on_lost=delivery.lost, on_error=handler.on_error,
            timeout_s=self.config.timeout_s, max_message_bytes=self.config.max_message_bytes,
            name=f"ucx-{self.endpoint.port}")
        self._client.start()

    def release_staged(self, version: int) -> None:
        self._pool.release(version)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._delivery is not None:
            self._delivery.close()
        self._backend.close()

    def _on_frame(self, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        op = msg["op"]
        if op == "tx":
            return
        if op == "bucket":
            try:
                self._recv_bucket(msg)
            except WireFormatError as exc:
                log.warning("malformed bucket message from the publisher: %s", exc)
                pending = EventPending(1)
                pending.finish(exc)
                self._delivery.bucket(msg["version"], msg["index"], memoryview(b""), pending)
            return
        if op == "abort":
            self._delivery.abandon(msg["version"])
        self._delivery.frame(msg)

    def _recv_bucket(self, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        length, chunk = tcp.bucket_geometry(msg)
        base = tcp.field(msg, "tag", int, minimum=0, maximum=(1 << 64) - 1)
        parts = tcp.chunks(length, chunk)
        if len(parts) > 1 << _CHUNK_BITS or base & ((1 << _CHUNK_BITS) - 1):
            raise WireFormatError(f"bucket tag {base:#x} / {len(parts)} chunks do not fit the tag layout")
        hbuf = self._pool.lend(msg["version"], length)
        arr = numpy_view(hbuf)
        reqs = [self._backend.recv(arr[off:off + size], base + k) for k, (off, size) in enumerate(parts)]
        pending = _PolledPending(self._backend, reqs)
        hbuf.busy = lambda: not pending.done()
        self._delivery.bucket(msg["version"], msg["index"], hbuf.mem[:length], pending,
                              on_abandon=lambda: self._pool.forget(hbuf))


__all__ = ["UcxPublisher", "UcxReceiver"]
