"""``cuda_ipc`` (``shm://NAME``, same node): buckets assembled in GPU memory, pulled device to device.

Data path, per bucket:

1. **Pack** (publisher): :meth:`CudaIpcPublisher.pack` writes the header into host bytes and copies
   every tensor slice straight into a reused device buffer -- from GPU tensors, or from CPU and
   pinned memory for offloaded trainers (a host-to-device copy; with ``send_dtype`` the cast happens
   in the same copy), one copy per tensor slice. The bucket is then digested in one pass
   (:mod:`hotweights_trainer.gpu.checksum`) queued behind the copies; the digest goes into the header
   (``FLAG_DEVICE``) and reading it is the one synchronisation per bucket.
2. **Post**: the buffer is exported once per receiver with torch's CUDA IPC
   (:mod:`hotweights_trainer.gpu.memory`) and announced in a ``tx/ipc_bucket`` control message: the
   export (handle bytes as hex), the header (hex) and a key. Nothing is pickled; with
   ``HOTWEIGHTS_HANDLE_TOKEN`` the message is HMAC-signed. The post is an in-flight *handle*
   (:class:`~hotweights_trainer.control.handles.HandleTable`): its holders are the receivers it went
   to, its TTL is ``HOTWEIGHTS_HANDLE_TTL``.
3. **Pull** (receiver): the receiver opens the export (once per buffer; the mapping is reused for
   later versions), copies the payload device to device into its *own* staged buffer in chunks over
   ``HOTWEIGHTS_IPC_COPY_STREAMS`` streams, digests its copy in one pass, synchronises and acks the
   key. The ack ends that receiver's hold; the last ack releases the handle and frees its slot of
   the in-flight window. The engine then verifies the header and compares the digests; the version
   goes through the usual two-phase commit, and applying it is a device-side scatter
   (:func:`hotweights_trainer.gpu.scatter.apply_device`).

Why receivers copy instead of reading the publisher's buffer in place: a staged version must survive
its publisher. Reading another process's CUDA IPC memory after that process died is undefined
behaviour (at best a sticky CUDA error that takes the inference server down), so a receiver never
keeps depending on the trainer's memory once it acked.

Buffers: a buffer is handed out again only when the engine recycled it (no receiver holds its
version, and it is neither the committed nor the open version -- late joiners are served from the
committed version's buffers, so the trainer's GPU holds up to two versions of bucket buffers) *and*
no in-flight handle on it is pending -- every receiver acked it or its TTL passed. An expired
handle frees its slot and is logged; the engine's own handle expiry makes the transport free the
buffer for good (``discard``) rather than reuse it. Receivers drop their mappings when told
(``tx/ipc_close``), when they lose the publisher, and when they close (saying ``tx/ipc_bye`` first);
each mapping's reference is then released by the receiver itself. A receiver that died cannot, so
when a connection drops without a goodbye the publisher releases that receiver's IPC references once
it sees the process is gone (checked for a grace period), and parked buffers are collected: nothing
leaks after a receiver dies. Every reference is released exactly once -- by its receiver or, for a
dead one, by the publisher -- because torch parks a buffer whose counter went below zero for good.

Window and backpressure are the shared controller's (:mod:`.window`, ``HOTWEIGHTS_IPC_*``): ``post``
waits (bounded by ``timeout_s``) while the window or byte cap is full, and the adaptive window
follows the measured post-to-last-ack time. ``hotweights_ipc_congestion_risk`` is computed from the
same measurements (:mod:`hotweights_trainer.gpu.congestion`).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from ..config import SyncConfig
from ..control.handles import HandleTable, sign_handle, verify_handle
from ..errors import EndpointError, HotweightsError, WireFormatError
from ..gpu import autotune
from ..gpu.bucket import DeviceBucket
from ..gpu.checksum import DigestAccumulator
from ..gpu.memory import IpcMemory, default_memory
from ..gpu.pool import DeviceBuffer, DevicePool, StagedPool
from ..gpu.scatter import DeviceScatter
from ..gpu.topology import PathUsage, probe
from ..wire.bucket import ENC_DENSE, FLAG_DEVICE, seal_header, write_header
from ..wire.packer import PlannedBucket
from .base import (BucketBuffer, PublisherHandler, ReceiverHandler, TransportStats)
from .control_channel import ClientReceiver, ControlClient, ControlServer, ServedPublisher
from .endpoint import Endpoint
from .meter import TransportMeter
from .shm import control_address
from .shm_blocks import pid_alive
from .window import InflightWindow, WindowGate

log = logging.getLogger(__name__)

memory_factory: Callable[[], IpcMemory] = default_memory
"""What both sides allocate, export and open bucket memory with (CUDA IPC on the current device).
Replaceable as a whole: the test suite runs this transport's protocol over host shared memory on
machines without a GPU."""

ORPHAN_GRACE_S = 5.0
"""How long after a receiver's connection dropped the publisher keeps checking whether its process
died (then it releases that receiver's IPC references itself); a live one closes them on its own."""


def _check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.scheme != "shm":
        raise EndpointError(f"the cuda_ipc transport needs an shm://NAME endpoint (same node), got {endpoint}")


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=dst.is_cuda or src.is_cuda)  # pinned host sources stay asynchronous


def _sig_parts(endpoint: Endpoint, msg: dict[str, Any]) -> tuple:
    export = msg.get("export") if isinstance(msg.get("export"), dict) else {}
    return (str(endpoint), msg.get("version"), msg.get("index"), msg.get("key"), msg.get("buffer"),
            export.get("handle"), export.get("offset"), export.get("path"), msg.get("header"))


@dataclass
class _Flight:
    buf: DeviceBuffer
    nbytes: int
    t0: float


class CudaIpcPublisher(ServedPublisher):
    name: ClassVar[str] = "cuda_ipc"
    zero_copy: ClassVar[bool] = False
    multi_receiver: ClassVar[bool] = True
    cross_host: ClassVar[bool] = False
    addressable: ClassVar[bool] = True
    late_join: ClassVar[bool] = True
    pipelined: ClassVar[bool] = True
    survives_receiver_death: ClassVar[bool] = True
    supports_delta: ClassVar[bool] = False
    limits: ClassVar[dict[str, str]] = {
        "cross_host": "CUDA IPC handles open only on the node that exported them",
        "zero_copy": "each receiver copies every bucket device to device into its own staged buffer, so a "
                     "staged version never depends on the trainer's memory",
        "delta": "buckets live in GPU memory; delta sync encodes on the host, so versions go dense",
    }

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        super().__init__(endpoint, config)
        self._memory = memory_factory()
        self._pool = DevicePool(self._memory.alloc, config.bucket_bytes)
        self._gate = WindowGate(InflightWindow.from_config(config), timeout_s=config.timeout_s,
                                name=f"cuda_ipc {endpoint}")
        self._meter = TransportMeter("cuda_ipc", str(endpoint), self._gate)
        self._handles = HandleTable(config.handle_ttl)
        self._flights: dict[str, _Flight] = {}
        self._pids: dict[str, int] = {}
        self._graceful: set[str] = set()
        self._orphans: list[tuple[float, int, list[dict[str, Any]]]] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._server: Optional[ControlServer] = None
        self._closed = False
        self._collect = False

    # ---------------------------------------------------------------- lifecycle
    def start(self, handler: PublisherHandler) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(control_address(self.endpoint.name))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise EndpointError(
                    f"another publisher already serves {self.endpoint}; use another name or close it") from None
            raise
        sock.listen(128)
        self._server = ControlServer(sock, transport=self, events=handler, timeout_s=self.config.timeout_s,
                                     max_message_bytes=self.config.max_message_bytes, name=self.endpoint.name)
        self._server.start()
        log.info("cuda_ipc transport on %s (device %s, window %d, byte cap %s)", self.endpoint,
                 self._memory.device, self._gate.window.window, self.config.ipc_inflight_bytes or "off")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            self._flights.clear()
            for buf in self._pool.clear():
                buf.exports.clear()
                buf.tensor = None
            for _, pid, exports in self._orphans:
                if not pid_alive(pid):  # a live receiver releases its own references
                    for export in exports:
                        self._memory.release_export(export)
            self._orphans.clear()
        self._memory.collect()

    # ---------------------------------------------------------------- buckets
    def alloc(self, nbytes: int) -> BucketBuffer:
        self._sweep()
        with self._lock:
            busy = {f.buf.id for f in self._flights.values()}
        buf = self._pool.get(nbytes, usable=lambda b: b.id not in busy)
        return BucketBuffer(mem=memoryview(b""), handle=f"cuda_ipc:{buf.id}", capacity=buf.size, owner=buf)

    def pack(self, buf: BucketBuffer, plan: PlannedBucket, *, version: int, index: int, session: int,
             flags: int = 0) -> int:
        """Header into host bytes, payload straight into the device buffer, digested on the device."""
        dev: DeviceBuffer = buf.owner
        if plan.total_len > dev.size:
            raise WireFormatError(f"bucket of {plan.total_len} bytes does not fit its {dev.size}-byte buffer")
        header = bytearray(plan.header_len)
        hlen = write_header(memoryview(header), version=version, index=index, session=session, entries=plan.entries,
                            payload_len=plan.payload_len, flags=flags | FLAG_DEVICE, payload_inline=False)
        payload = dev.tensor[:plan.payload_len]
        for entry, src in zip(plan.entries, plan.sources):
            if entry.encoding != ENC_DENSE:
                raise WireFormatError(f"tensor {entry.name!r}: the cuda_ipc transport sends dense entries only")
            if not (entry.elem_count and entry.payload_nbytes):
                continue
            flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().reshape(-1)
            if not plan.presliced:
                flat = flat[entry.elem_start:entry.elem_start + entry.elem_count]
            _copy_into(payload[entry.payload_off:entry.payload_off + entry.payload_nbytes].view(entry.dtype), flat)
        # One digest pass after the copies, queued behind them on the same stream: per-chunk digests
        # cost more in launches and Python than re-reading the bucket (bench/bench_device_copy.py).
        digest = DigestAccumulator(plan.payload_len, payload.device)
        if plan.payload_len:
            digest.add(payload, 0)
        value = digest.value()  # the one synchronisation: every copy into the buffer is complete now
        seal_header(memoryview(header), value)
        dev.header = bytes(header)
        dev.payload_len = plan.payload_len
        dev.length = hlen + plan.payload_len
        return dev.length

    def post(self, to: Sequence[str], version: int, index: int, buf: BucketBuffer) -> None:
        to = sorted(to)
        if not to:
            return
        dev: DeviceBuffer = buf.owner
        self._gate.acquire(dev.length)
        with self._lock:
            self._seq += 1
            key = f"{version}.{index}.{self._seq}"
            self._handles.post(key, buf.handle, version, str(self._memory.device), to, time.monotonic())
            self._flights[key] = _Flight(dev, dev.length, time.perf_counter())
        header_hex = dev.header.hex()
        for rid in to:
            try:
                export = self._export(dev, rid)
            except BaseException:
                self._settle_holder(key, rid)
                raise
            msg = {"op": "tx", "kind": "ipc_bucket", "version": version, "index": index, "key": key,
                   "buffer": dev.id, "export": export, "header": header_hex, "payload_len": dev.payload_len}
            if self.config.handle_token is not None:
                msg["sig"] = sign_handle(self.config.handle_token, *_sig_parts(self.endpoint, msg))
            if self.send([rid], msg):
                self._settle_holder(key, rid)  # unreachable: reported lost, holds nothing
        self._meter.refresh()

    def _export(self, dev: DeviceBuffer, rid: str) -> dict[str, Any]:
        with self._lock:
            export = dev.exports.get(rid)
            if export is None:
                export = self._memory.export(dev.tensor)
                dev.exports[rid] = export
            return export

    def recycle(self, buf: BucketBuffer) -> None:
        self._pool.put(buf.owner)

    def discard(self, buf: BucketBuffer) -> None:
        """The engine's handle on ``buf`` expired: free it for good instead of reusing it."""
        dev: DeviceBuffer = buf.owner
        if not self._pool.remove(dev):
            return
        with self._lock:
            holders = sorted(dev.exports)
            dev.tensor = None  # parked by torch until every receiver that opened it closed it
            self._collect = True
        self.send([r for r in holders if r in self._pids], {"op": "tx", "kind": "ipc_close", "buffers": [dev.id]})
        log.info("freed expired cuda_ipc buffer %d", dev.id)

    def stats(self) -> TransportStats:
        self._meter.refresh()
        s = self._meter.stats
        s.extra["buffers_created"] = float(self._pool.created)
        s.extra["handles_expired"] = float(self._handles.expired)
        return s

    # ---------------------------------------------------------------- acks, losses, expiry
    def _settle_holder(self, key: str, rid: str) -> None:
        with self._lock:
            released = self._handles.ack(key, rid, time.monotonic())
            flight = self._flights.pop(key, None) if released is not None else None
        if flight is not None:
            self._settle(flight)

    def _settle(self, flight: _Flight, moved: bool = True) -> None:
        dt = time.perf_counter() - flight.t0
        self._gate.release(flight.nbytes, dt)
        if moved:
            self._meter.moved(flight.nbytes, dt)
        else:
            self._meter.refresh()

    def on_transport_message(self, rid: str, msg: dict[str, Any]) -> None:
        if msg["kind"] == "ipc_ack":
            self._on_ack(rid, msg)
        elif msg["kind"] == "ipc_bye":
            self._on_bye(rid)

    def housekeep(self) -> None:
        self._sweep()

    def admit(self, rid: str, hello: dict[str, Any]) -> bool:
        tx = hello.get("tx") if isinstance(hello.get("tx"), dict) else {}
        if tx.get("transport") != "cuda_ipc":
            theirs = tx.get("transport") or "shm"
            reason = (f"transport mismatch: this publisher uses cuda_ipc, the receiver {theirs!r}; set "
                      "HOTWEIGHTS_TRANSPORT alike on both sides (auto picks cuda_ipc only where CUDA is available)")
            log.error("receiver %s: %s; refusing it", rid, reason)
            self.send([rid], {"op": "refused", "reason": reason})
            self.drop(rid, reason)
            return False
        with self._lock:
            self._pids[rid] = hello["pid"]
        return True

    def _on_ack(self, rid: str, msg: dict[str, Any]) -> None:
        key = msg.get("key")
        if not isinstance(key, str):
            log.warning("receiver %s sent a malformed ipc_ack; ignoring it", rid)
            return
        if msg.get("ok") is False:
            log.info("receiver %s could not copy %s", rid, key)
        self._settle_holder(key, rid)

    def _on_bye(self, rid: str) -> None:
        with self._lock:
            self._graceful.add(rid)

    def forget(self, rid: str) -> None:
        now = time.monotonic()
        with self._lock:
            pid = self._pids.pop(rid, None)
            graceful = rid in self._graceful
            self._graceful.discard(rid)
            released = self._handles.forget_holder(rid, now)
            flights = [self._flights.pop(h.key) for h in released if h.key in self._flights]
            exports = [buf.exports.pop(rid) for buf in self._pool.all.values() if rid in buf.exports]
            if exports and pid is not None and not graceful:
                self._orphans.append((now + ORPHAN_GRACE_S, pid, exports))
        for f in flights:
            self._settle(f, moved=False)
        self._sweep()

    def _sweep(self) -> None:
        """Expired in-flight handles free their window slot; dead receivers' IPC references go."""
        now = time.monotonic()
        with self._lock:
            expired = self._handles.expire(now)
            flights = [(h, self._flights.pop(h.key)) for h in expired if h.key in self._flights]
            keep, dead = [], []
            for until, pid, exports in self._orphans:
                if not pid_alive(pid):
                    dead.extend(exports)
                elif now < until:
                    keep.append((until, pid, exports))
            self._orphans = keep
            collect, self._collect = self._collect or bool(dead), False
        for h, f in flights:
            log.warning("cuda_ipc handle %s (%s) expired after %.1fs with holder(s) %s; its buffer may be reused",
                        h.key, h.name, self.config.handle_ttl, ", ".join(sorted(h.holders)))
            self._settle(f, moved=False)
        for export in dead:
            self._memory.release_export(export)
        if dead:
            log.info("released %d IPC reference(s) held by receiver process(es) that died", len(dead))
        if collect:
            self._memory.collect()
        self._meter.refresh()


def _int(msg: dict[str, Any], key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireFormatError(f"tx/ipc_bucket: field {key!r} must be an integer >= 0")
    return value


class CudaIpcReceiver(ClientReceiver):
    name: ClassVar[str] = "cuda_ipc"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        super().__init__(endpoint, config)
        self._memory = memory_factory()
        self._staged = StagedPool(self._memory.alloc, config.bucket_bytes)
        self._opened: dict[int, torch.Tensor] = {}
        self._paths = PathUsage(str(endpoint))
        self._pull: dict[tuple[str, str], DeviceScatter] = {}
        self._apply: Optional[DeviceScatter] = None
        self._client: Optional[ControlClient] = None
        self._handler: Optional[ReceiverHandler] = None
        self.pulled_buckets = 0

    def start(self, handler: ReceiverHandler, hello: Callable[[], dict[str, Any]]) -> None:
        self._handler = handler
        address = control_address(self.endpoint.name)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.config.timeout_s)
            try:
                s.connect(address)
            except OSError:
                s.close()
                raise
            return s

        self._client = ControlClient(
            connect, hello=lambda: {**hello(), "tx": {"transport": "cuda_ipc", "device": str(self._memory.device)}},
            on_connected=lambda: handler.on_connected({}), on_frame=self._on_frame, on_lost=self._on_lost,
            on_error=handler.on_error,
            timeout_s=self.config.timeout_s, max_message_bytes=self.config.max_message_bytes,
            name=f"ipc-{self.endpoint.name}")
        self._client.start()

    def release_staged(self, version: int) -> None:
        self._staged.release(version)

    def close(self) -> None:
        self._opened.clear()  # our references go first; the goodbye says we released them ourselves
        if self._client is not None:
            try:
                self._client.send({"op": "tx", "kind": "ipc_bye"})
            except HotweightsError:
                pass  # publisher already gone: nobody to tell
            self._client.close()
            self._client = None
        self._staged.clear()

    @property
    def path_shares(self) -> dict[str, float]:
        return self._paths.shares()

    # ---------------------------------------------------------------- frames (control thread)
    def _on_frame(self, msg: dict[str, Any]) -> None:
        assert self._handler is not None
        op = msg["op"]
        if op == "tx":
            if msg["kind"] == "ipc_bucket":
                self._pull_bucket(msg)
            elif msg["kind"] == "ipc_close":
                for b in msg.get("buffers", []) if isinstance(msg.get("buffers"), list) else []:
                    if isinstance(b, int):
                        self._opened.pop(b, None)  # drops the mapping; torch releases the IPC reference
            return
        if op == "bucket":
            self._handler.on_bucket_failed(msg["version"], msg["index"], WireFormatError(
                "the publisher sends shm buckets but this receiver uses cuda_ipc; set HOTWEIGHTS_TRANSPORT alike "
                "on both sides"))
            return
        self._handler.on_message(msg)

    def _pull_bucket(self, msg: dict[str, Any]) -> None:
        assert self._handler is not None
        key = msg.get("key") if isinstance(msg.get("key"), str) else None
        try:
            version, index = _int(msg, "version"), _int(msg, "index")
        except WireFormatError as exc:
            log.warning("malformed tx/ipc_bucket from the publisher: %s", exc)
            self._ack(key, False)
            return
        try:
            bucket = self._copy_in(msg, version)
        # CUDA failures arrive as RuntimeError (torch.AcceleratorError); each becomes this bucket's
        # failure, so the version is rejected whole instead of the receiver thread dying.
        except (HotweightsError, RuntimeError, OSError, ValueError) as exc:
            log.warning("bucket %d of version %d could not be pulled: %s", index, version, exc)
            self._ack(key, False)
            self._handler.on_bucket_failed(version, index, exc)
            return
        self._ack(key, True)
        self.pulled_buckets += 1
        self._handler.on_bucket(version, index, bucket)

    def _copy_in(self, msg: dict[str, Any], version: int) -> DeviceBucket:
        if not isinstance(msg.get("key"), str):
            raise WireFormatError("tx/ipc_bucket: field 'key' must be a string")
        buffer_id = _int(msg, "buffer")
        payload_len = _int(msg, "payload_len")
        header_hex = msg.get("header")
        if not isinstance(header_hex, str) or len(header_hex) > 2 * self.config.max_message_bytes:
            raise WireFormatError("tx/ipc_bucket: field 'header' must be a hex string")
        token = self.config.handle_token
        if token is not None and not verify_handle(token, msg.get("sig"), *_sig_parts(self.endpoint, msg)):
            raise WireFormatError("bucket handle has no valid HMAC signature (HOTWEIGHTS_HANDLE_TOKEN differs from "
                                  "the publisher's?)")
        try:
            header = bytes.fromhex(header_hex)
        except ValueError:
            raise WireFormatError("tx/ipc_bucket: field 'header' is not hex") from None
        src = self._opened.get(buffer_id)
        if src is None:
            src = self._memory.open(msg.get("export"))
            self._opened[buffer_id] = src
        if src.numel() < payload_len:
            raise WireFormatError(f"bucket payload of {payload_len} bytes exceeds the exported {src.numel()}-byte buffer")
        dst = self._staged.lend(version, max(payload_len, 1))[:payload_len]
        digest = DigestAccumulator(payload_len, dst.device)
        self._pull_scatter(src, dst).copy([(dst, src[:payload_len])], digest=digest, sync=False)
        value = digest.value()  # synchronises: the copy into our own buffer is complete
        return DeviceBucket(dst, header_bytes=header, digest=value, scatter=self._apply_scatter(dst))

    def _pull_scatter(self, src: torch.Tensor, dst: torch.Tensor) -> DeviceScatter:
        k = (str(src.device), str(dst.device))
        scatter = self._pull.get(k)
        if scatter is None:
            link = autotune.link_between(probe(), src.device, dst.device) if self.config.ipc_copy_autotune else "same"
            p = autotune.resolve(self.config, "ipc", link=link, device=dst.device)
            scatter = self._pull[k] = DeviceScatter(p.chunk_bytes, p.streams, paths=self._paths, reason=p.reason)
        return scatter

    def _apply_scatter(self, staged: torch.Tensor) -> DeviceScatter:
        if self._apply is None:
            p = autotune.resolve(self.config, "ipc", link="same", device=staged.device)
            self._apply = DeviceScatter(p.chunk_bytes, p.streams, paths=self._paths, reason=p.reason)
        return self._apply

    def _ack(self, key: Optional[str], ok: bool) -> None:
        if key is None or self._client is None:
            return
        try:
            self._client.send({"op": "tx", "kind": "ipc_ack", "key": key, "ok": ok})
        except HotweightsError as exc:
            log.info("could not ack %s: %s", key, exc)  # publisher gone: its handles go with it

    def _on_lost(self, reason: str) -> None:
        self._opened.clear()  # never read a lost publisher's memory again; releases our references
        if self._handler is not None:
            self._handler.on_lost(reason)


__all__ = ["CudaIpcPublisher", "CudaIpcReceiver", "memory_factory", "ORPHAN_GRACE_S"]
