"""``torch`` transport (``tcp://HOST:PORT``): buckets broadcast over a dedicated torch.distributed group.

Layout:

- **Control**: the publisher listens on ``tcp://HOST:PORT`` with the framed JSON channel of
  :mod:`.control_channel` (membership, the commit protocol, group formation). It also hosts a
  ``TCPStore`` on an ephemeral port for group rendezvous.
- **Data**: a process group holding the publisher (rank 0) and exactly the receivers a bucket goes
  to, built from the store under a fresh prefix per *membership epoch*. It never touches the
  default process group, so the trainer's own data-parallel world is separate and untouched.
  When the set of receivers changes (a join, a loss, a late joiner's catch-up), the publisher
  sends each member a ``tx/group`` message and all of them -- and only them -- build the new group
  together. No rank outside a group ever has to take part in creating it, so a receiver that is
  slow, late or dead cannot deadlock a group it is not in. The last few groups are cached (the
  steady membership plus a catch-up group), older ones are torn down on both sides.
- **Buckets** are broadcast in ``HOTWEIGHTS_BCAST_CHUNK_MB`` blocks. Receivers post their side of
  each broadcast as soon as the ``bucket`` message arrives, into pre-faulted reused buffers, and
  hand buckets to the engine in order (:mod:`.delivery`).
- **Pipelining**: with ``HOTWEIGHTS_BCAST_PREFETCH=1`` ``post`` returns once the broadcast is
  queued, so the engine assembles the next bucket while this one is on the wire; the in-flight
  window and byte cap (:mod:`.window`) bound what is outstanding. Without it ``post`` returns
  when the bucket has been broadcast.
- **Backends**: gloo on CPU, nccl on CUDA/ROCm, ccl on Intel XPU (:mod:`.torch_backends`); on a
  device backend the root stages each chunk through device memory. Receivers of an nccl group
  broadcast straight into a device buffer of theirs and keep the bucket there: it is verified with
  xxh3 on a host copy (made chunk by chunk as it arrives) and applied on the GPU by the chunked,
  multi-stream scatter of :mod:`hotweights_trainer.gpu.scatter` (``HOTWEIGHTS_GPU_COPY_*``). Anything
  unavailable falls back to gloo, and the reason is logged.
- **Autotune** (``HOTWEIGHTS_BCAST_AUTOTUNE=1``): when the first group forms, publisher and members
  broadcast ``HOTWEIGHTS_BCAST_AUTOTUNE_MB`` in each candidate chunk size; the publisher logs the
  table and keeps the fastest.

Failures: a broadcast that fails (a member died or reset its connection) marks its group broken:
the publisher tears it down on both sides, ``post`` raises :class:`PeerLostError` (the engine
aborts the version) and the next version builds a new group from the receivers still connected.
Every wait is bounded by ``timeout_s`` (process-group timeout, store timeout, window deadline).
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

from ..config import SyncConfig, parse_int_list
from ..errors import (EndpointError, PeerLostError, SyncTimeoutError,
                      TransportUnavailableError, WireFormatError)
from . import tcp
from .base import (BucketBuffer, PublisherHandler, ReceiverHandler, TransportStats)
from .buffers import HostBuffer, HostBufferPool, ReceivePool
from .control_channel import ClientReceiver, ControlClient, ControlServer, ServedPublisher
from .delivery import EventPending, OrderedDelivery
from .endpoint import Endpoint
from .meter import TransportMeter
from .torch_backends import device_for, local_backends, make_group, pick_backend, usable
from .torch_collectives import DeviceStager, broadcast, host_tensor, retire_pg, run_autotune, watch
from .window import InflightWindow, WindowGate

log = logging.getLogger(__name__)

_GROUPS_KEPT = 3


def _require_torch_distributed() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise TransportUnavailableError("the torch transport needs torch.distributed, which this torch build lacks")


def _check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.scheme != "tcp":
        raise EndpointError(f"the torch transport needs a tcp://HOST:PORT endpoint, got {endpoint}")


@dataclass
class _Group:
    epoch: int
    rids: tuple[str, ...]
    pg: Any
    backend: str
    broken: Optional[str] = None
    stager: Optional[DeviceStager] = None


@dataclass
class _Flight:
    nbytes: int
    t0: float
    pending: EventPending
    group: _Group
    buf: HostBuffer
    version: int = 0
    settled: bool = False


class TorchPublisher(ServedPublisher):
    name: ClassVar[str] = "torch"
    zero_copy: ClassVar[bool] = False
    multi_receiver: ClassVar[bool] = True
    cross_host: ClassVar[bool] = True
    addressable: ClassVar[bool] = True
    late_join: ClassVar[bool] = True
    pipelined: ClassVar[bool] = True
    survives_receiver_death: ClassVar[bool] = True
    limits: ClassVar[dict[str, str]] = {
        "zero_copy": "bytes are broadcast into each receiver's own buffer",
    }

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        _require_torch_distributed()
        super().__init__(endpoint, config)
        self._pool = HostBufferPool(config.bucket_bytes)
        self._gate = WindowGate(InflightWindow.from_config(config), timeout_s=config.timeout_s,
                                name=f"torch {endpoint}")
        self._meter = TransportMeter("torch", str(endpoint), self._gate)
        self._server: Optional[ControlServer] = None
        self._store: Any = None
        self._caps: dict[str, list[str]] = {}
        self._groups: collections.OrderedDict[tuple[str, ...], _Group] = collections.OrderedDict()
        self._epoch = 0
        self._chunk = config.bcast_chunk_mb << 20
        self._tuned = not config.bcast_autotune
        self._flights: list[_Flight] = []
        self._lost_version: Optional[tuple[int, PeerLostError]] = None  # latest version a broken group failed
        self._lock = threading.RLock()
        self._local = local_backends()
        self._device_pool: Optional[ThreadPoolExecutor] = None
        self._closed = False

    # ---------------------------------------------------------------- lifecycle
    def start(self, handler: PublisherHandler) -> None:
        import torch.distributed as dist

        sock = tcp.listen(self.endpoint)
        store_host = self.endpoint.host if self.endpoint.host not in tcp.WILDCARDS else "0.0.0.0"
        try:
            self._store = dist.TCPStore(store_host, 0, None, True, datetime.timedelta(seconds=self.config.timeout_s),
                                        wait_for_workers=False)
        except Exception as exc:  # noqa: BLE001 - any store failure means we cannot serve; say why
            sock.close()
            raise TransportUnavailableError(f"torch transport: cannot host a TCPStore on {store_host}: {exc}") from exc
        self._server = ControlServer(sock, transport=self, events=handler, timeout_s=self.config.timeout_s,
                                     max_message_bytes=self.config.max_message_bytes, name=str(self.endpoint.port))
        self._server.start()
        log.info("torch transport listening on %s (store port %d, chunk %d MiB, prefetch %s, backends here: %s)",
                 self.endpoint, self._store.port, self._chunk >> 20, self.config.bcast_prefetch,
                 ", ".join(usable(self._local)))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            groups = list(self._groups.values())
            self._groups.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for g in groups:
            retire_pg(g.pg)
        if self._device_pool is not None:
            self._device_pool.shutdown(wait=False)
        self._pool.clear()
        self._store = None

    # ---------------------------------------------------------------- buckets
    def alloc(self, nbytes: int) -> BucketBuffer:
        buf = self._pool.get(nbytes)
        return BucketBuffer(mem=buf.mem, handle="torch", capacity=buf.size, owner=buf)

    def post(self, to: Sequence[str], version: int, index: int, buf: BucketBuffer) -> None:
        to = sorted(to)
        if not to:
            return
        n = buf.length
        group = self._group_for(to)
        self._gate.acquire(n)
        flight = _Flight(n, time.perf_counter(), EventPending(), group, buf.owner, version)
        try:
            if group.broken:
                raise PeerLostError(f"broadcast group {group.epoch} is broken: {group.broken}")
            msg = {"op": "bucket", "version": version, "index": index, "handle": f"torch:{group.epoch}",
                   "offset": 0, "length": n, "chunk": self._chunk}
            unreachable = self.send(to, msg)
            if unreachable:
                self._break(group, f"receiver(s) {', '.join(unreachable)} unreachable")
                raise PeerLostError(f"receiver(s) {', '.join(unreachable)} went away before bucket {index} of "
                                    f"version {version}")
            self._start_broadcast(flight, buf.owner, n)
        except BaseException:
            self._gate.release(n, 0.0)
            raise
        with self._lock:
            if not flight.settled:
                self._flights.append(flight)
        buf.owner.busy = lambda: not flight.pending.done()
        if not self.config.bcast_prefetch:
            self._wait_flight(flight)
        self._reap()

    def _start_broadcast(self, flight: _Flight, hbuf: HostBuffer, n: int) -> None:
        group = flight.group
        tensor = host_tensor(hbuf)
        parts = tcp.chunks(n, self._chunk)
        settle = lambda _p, f=flight: self._settle(f)  # noqa: E731 - runs on the backend's thread
        if group.stager is None:
            flight.pending = EventPending(len(parts), on_done=settle)
            for off, size in parts:
                watch(broadcast(group.pg, tensor[off:off + size]), flight.pending)
        else:  # pragma: no cover - device backends need a GPU/XPU
            flight.pending = EventPending(1, on_done=settle)
            if self._device_pool is None:
                self._device_pool = ThreadPoolExecutor(1, thread_name_prefix="hotweights-bcast")

            def run(p: EventPending = flight.pending) -> None:
                try:
                    group.stager.run(group.pg, tensor, n, self._chunk, root=True)
                except Exception as exc:  # noqa: BLE001 - becomes the flight's error
                    p.finish(exc)
                    return
                p.finish()

            self._device_pool.submit(run)

    def _wait_flight(self, flight: _Flight) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        while not flight.pending.wait(0.05):
            if time.monotonic() > deadline:
                self._break(flight.group, "broadcast timed out")
                self._reap()
                raise SyncTimeoutError(f"broadcast of a {flight.nbytes}-byte bucket to group {flight.group.epoch} "
                                       f"did not finish within {self.config.timeout_s:.1f}s")
        self._reap()
        err = flight.pending.error()
        if err is not None:
            raise PeerLostError(f"broadcast to group {flight.group.epoch} ({', '.join(flight.group.rids)}) "
                                f"failed: {err}")

    def _settle(self, flight: _Flight) -> None:
        """A broadcast finished: free its window slot, count it, or mark its group broken."""
        with self._lock:
            if flight.settled:
                return
            flight.settled = True
            if flight in self._flights:
                self._flights.remove(flight)
        dt = time.perf_counter() - flight.t0
        err = flight.pending.error()
        if err is not None:
            self._break(flight.group, str(err).splitlines()[0][:300])
            with self._lock:
                self._lost_version = (flight.version, PeerLostError(
                    f"version {flight.version}: the broadcast to group {flight.group.epoch} "
                    f"({', '.join(flight.group.rids)}) failed: {str(err).splitlines()[0][:300]}"))
        else:
            self._meter.moved(flight.nbytes, dt)
        self._gate.release(flight.nbytes, dt)

    def _reap(self) -> None:
        with self._lock:
            done = [f for f in self._flights if f.pending.done()]
        for f in done:
            self._settle(f)
        self._meter.refresh()

    def recycle(self, buf: BucketBuffer) -> None:
        self._pool.put(buf.owner)

    def delivery_error(self, version: int) -> Optional[Exception]:
        self._reap()  # settles finished broadcasts, failed ones included
        with self._lock:
            lost = self._lost_version
        return lost[1] if lost is not None and lost[0] == version else None

    def stats(self) -> TransportStats:
        self._reap()
        return self._meter.stats

    @property
    def chunk_bytes(self) -> int:
        return self._chunk

    # ---------------------------------------------------------------- groups
    def _group_for(self, to: list[str]) -> _Group:
        key = tuple(to)
        with self._lock:
            g = self._groups.get(key)
            if g is not None and not g.broken:
                self._groups.move_to_end(key)
                return g
            if g is not None:
                self._groups.pop(key)
                self._retire(g)
            self._epoch += 1
            epoch = self._epoch
        backend, reason = pick_backend(self.config.torch_backend, usable(self._local),
                                       {rid: self._caps.get(rid, ["gloo"]) for rid in key})
        if reason:
            log.info("torch transport group %d uses %s: %s", epoch, backend, reason)
        autotune = None if self._tuned else {"mb": self.config.bcast_autotune_mb,
                                             "chunks_mb": parse_int_list(self.config.bcast_autotune_chunks_mb)}
        for rank, rid in enumerate(key, start=1):
            msg = {"op": "tx", "kind": "group", "epoch": epoch, "rank": rank, "size": len(key) + 1,
                   "store_port": self._store.port, "backend": backend}
            if autotune:
                msg["autotune"] = autotune
            if self.send([rid], msg):
                raise PeerLostError(f"receiver {rid} went away while forming broadcast group {epoch}")
        t0 = time.perf_counter()
        import torch.distributed as dist

        host = self.endpoint.host if self.endpoint.host not in tcp.WILDCARDS else None
        try:
            pg = make_group(backend, dist.PrefixStore(f"hotweights/{epoch}/", self._store), 0, len(key) + 1,
                            self.config.timeout_s, host)
        except Exception as exc:  # noqa: BLE001 - a member that never joined; tell the rest, raise typed
            self.send(key, {"op": "tx", "kind": "ungroup", "epoch": epoch})
            raise PeerLostError(f"could not form broadcast group {epoch} with {', '.join(key)} within "
                                f"{self.config.timeout_s:.1f}s: {str(exc).splitlines()[0][:300]}") from None
        group = _Group(epoch, key, pg, backend)
        if backend != "gloo":  # pragma: no cover - needs a GPU/XPU
            group.stager = DeviceStager(device_for(backend), self._chunk)
        log.info("torch transport: formed %s group %d with %d receiver(s) in %.0f ms", backend, epoch, len(key),
                 (time.perf_counter() - t0) * 1e3)
        if autotune:
            self._chunk = run_autotune(group.pg, autotune, root=True, stager=group.stager)
            self._tuned = True
        with self._lock:
            self._groups[key] = group
            while len(self._groups) > _GROUPS_KEPT:
                _, old = self._groups.popitem(last=False)
                self._retire(old)
        return group

    def _break(self, group: _Group, reason: str) -> None:
        with self._lock:
            if group.broken:
                return
            group.broken = reason
        log.warning("torch transport: broadcast group %d (%s) broke: %s", group.epoch, ", ".join(group.rids), reason)

    def _retire(self, group: _Group) -> None:
        self.send(group.rids, {"op": "tx", "kind": "ungroup", "epoch": group.epoch})
        retire_pg(group.pg)

    # ---------------------------------------------------------------- control hooks (control thread)
    def admit(self, rid: str, hello: dict[str, Any]) -> bool:
        tx = hello.get("tx") if isinstance(hello.get("tx"), dict) else {}
        if tx.get("transport") != "torch":
            log.error("receiver %s uses transport %r but this publisher uses torch (set HOTWEIGHTS_TRANSPORT "
                      "alike on both sides); disconnecting it", rid, tx.get("transport"))
            self.drop(rid, f"transport mismatch: receiver {tx.get('transport')!r}, publisher 'torch'")
            return False
        caps = tx.get("backends")
        if not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
            caps = ["gloo"]
        self._caps[rid] = caps
        return True

    def housekeep(self) -> None:
        self._reap()

    def forget(self, rid: str) -> None:
        self._caps.pop(rid, None)
        with self._lock:
            for key, g in list(self._groups.items()):
                if rid in key:
                    self._groups.pop(key)
                    self._break(g, f"receiver {rid} left")
                    self._retire(g)


class TorchReceiver(ClientReceiver):
    name: ClassVar[str] = "torch"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        _require_torch_distributed()
        super().__init__(endpoint, config)
        self._pool = ReceivePool(config.bucket_bytes)
        self._client: Optional[ControlClient] = None
        self._delivery: Optional[OrderedDelivery] = None
        self._groups: dict[int, _Group] = {}
        self._store: Any = None
        self._store_port: Optional[int] = None
        self._local_ip: Optional[str] = None
        self._backends = usable(local_backends())
        self._device_pool: Any = None  # staged device buckets of nccl groups (gpu.pool.StagedPool)
        self._gpu_scatter: Any = None

    def start(self, handler: ReceiverHandler, hello: Callable[[], dict[str, Any]]) -> None:
        self._delivery = OrderedDelivery(handler, timeout_s=self.config.timeout_s, name=f"torch-{self.endpoint.port}")
        delivery = self._delivery

        def connect():
            sock = tcp.connect(self.endpoint, self.config.timeout_s)
            self._local_ip = tcp.local_address(sock)
            return sock

        self._client = ControlClient(
            connect, hello=lambda: {**hello(), "tx": {"transport": "torch", "backends": self._backends}},
            on_connected=lambda: delivery.connected({}), on_frame=self._on_frame, on_lost=self._on_lost,
            on_error=handler.on_error,
            timeout_s=self.config.timeout_s, max_message_bytes=self.config.max_message_bytes,
            name=f"torch-{self.endpoint.port}")
        self._client.start()

    def release_staged(self, version: int) -> None:
        self._pool.release(version)
        if self._device_pool is not None:
            self._device_pool.release(version)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._delivery is not None:
            self._delivery.close()
        for g in self._groups.values():
            retire_pg(g.pg)
        self._groups.clear()
        self._store = None

    # ---------------------------------------------------------------- frames (control thread)
    def _on_frame(self, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        op = msg["op"]
        try:
            if op == "tx":
                kind = msg["kind"]
                if kind == "group":
                    self._form(msg)
                elif kind == "ungroup":
                    g = self._groups.pop(tcp.field(msg, "epoch", int, minimum=0), None)
                    if g is not None:
                        retire_pg(g.pg)
                return
            if op == "bucket":
                self._recv_bucket(msg)
                return
        except WireFormatError as exc:
            log.warning("malformed %r message from the publisher: %s", op, exc)
            if op == "bucket":
                self._failed_bucket(msg, exc)
            return
        if op == "abort":
            self._delivery.abandon(msg["version"])
        self._delivery.frame(msg)

    def _form(self, msg: dict[str, Any]) -> None:
        import torch.distributed as dist

        epoch = tcp.field(msg, "epoch", int, minimum=0)
        rank = tcp.field(msg, "rank", int, minimum=1)
        size = tcp.field(msg, "size", int, minimum=2, maximum=1 << 20)
        port = tcp.field(msg, "store_port", int, minimum=1, maximum=65535)
        backend = tcp.field(msg, "backend", str)
        if rank >= size or backend not in self._backends:
            raise WireFormatError(f"tx/group: rank {rank} of {size} with backend {backend!r} is not valid here")
        autotune = msg.get("autotune")
        if autotune is not None:
            tcp.field(autotune, "mb", int, minimum=1, maximum=1 << 16)
            chunks = autotune.get("chunks_mb")
            if not (isinstance(chunks, list) and chunks and len(chunks) <= 64
                    and all(isinstance(c, int) and 0 < c <= 1 << 16 for c in chunks)):
                raise WireFormatError("tx/group: autotune chunks_mb must be a short list of positive integers")
        try:
            if self._store is None or self._store_port != port:
                self._store = dist.TCPStore(self.endpoint.host, port, None, False,
                                            datetime.timedelta(seconds=self.config.timeout_s))
                self._store_port = port
            pg = make_group(backend, dist.PrefixStore(f"hotweights/{epoch}/", self._store), rank, size,
                            self.config.timeout_s, self._local_ip)
        except Exception as exc:  # noqa: BLE001 - the publisher sees the same failure and aborts; log ours
            log.warning("could not join broadcast group %d: %s", epoch, str(exc).splitlines()[0][:300])
            self._store = None
            return
        group = _Group(epoch, (), pg, backend)
        if backend != "gloo":  # pragma: no cover - needs a GPU/XPU
            group.stager = DeviceStager(device_for(backend), 32 << 20)
        self._groups[epoch] = group
        log.debug("joined %s broadcast group %d as rank %d of %d", backend, epoch, rank, size)
        if autotune is not None:
            try:
                run_autotune(pg, autotune, root=False, stager=group.stager)
            except Exception as exc:  # noqa: BLE001 - a failed autotune breaks only this group
                log.warning("broadcast autotune in group %d failed: %s", epoch, exc)

    def _recv_bucket(self, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        length, chunk = tcp.bucket_geometry(msg)
        handle = msg["handle"]
        prefix, _, epoch_text = handle.partition(":")
        if prefix != "torch" or not epoch_text.isdigit():
            raise WireFormatError(f"bucket handle {handle!r} is not a torch group handle")
        group = self._groups.get(int(epoch_text))
        if group is None:
            self._failed_bucket(msg, PeerLostError(f"bucket for broadcast group {epoch_text}, which this receiver "
                                                   "is not in"))
            return
        version, index = msg["version"], msg["index"]
        hbuf = self._pool.lend(version, length)
        tensor = host_tensor(hbuf)
        parts = tcp.chunks(length, chunk)
        if group.stager is None:
            pending = EventPending(len(parts))
            try:
                for off, size in parts:
                    watch(broadcast(group.pg, tensor[off:off + size]), pending)
            except Exception as exc:  # noqa: BLE001 - a dead group raises at once; fail this bucket
                pending = EventPending(1)
                pending.finish(exc)
        else:  # pragma: no cover - device backends
            pending = EventPending(1)
            data = hbuf.mem[:length]
            try:
                if group.backend == "nccl":
                    dev = self._device_buffer(version, length)
                    group.stager.receive_into(group.pg, dev, tensor, length, chunk)
                    data = self._device_bucket(dev, data)
                else:
                    group.stager.run(group.pg, tensor, length, chunk, root=False)
                pending.finish()
            except Exception as exc:  # noqa: BLE001 - becomes the bucket's failure
                pending.finish(exc)
            hbuf.busy = lambda: not pending.done()
            self._delivery.bucket(version, index, data, pending, on_abandon=lambda: self._pool.forget(hbuf))
            return
        hbuf.busy = lambda: not pending.done()
        self._delivery.bucket(version, index, hbuf.mem[:length], pending, on_abandon=lambda: self._pool.forget(hbuf))

    def _device_buffer(self, version: int, length: int) -> Any:  # pragma: no cover - needs a GPU
        import torch

        from ..gpu.pool import StagedPool

        if self._device_pool is None:
            device = torch.device("cuda", torch.cuda.current_device())
            self._device_pool = StagedPool(lambda n: torch.empty(n, dtype=torch.uint8, device=device),
                                           self.config.bucket_bytes)
        return self._device_pool.lend(version, length)[:length]

    def _device_bucket(self, dev: Any, host: memoryview) -> Any:  # pragma: no cover - needs a GPU
        from ..gpu import autotune
        from ..gpu.bucket import DeviceBucket
        from ..gpu.scatter import DeviceScatter
        from ..gpu.topology import PathUsage

        if self._gpu_scatter is None:
            p = autotune.resolve(self.config, "gpu", link="same", device=dev.device)
            self._gpu_scatter = DeviceScatter(p.chunk_bytes, p.streams, paths=PathUsage(str(self.endpoint)),
                                              reason=p.reason)
        return DeviceBucket(dev, host=host, scatter=self._gpu_scatter)

    def _failed_bucket(self, msg: dict[str, Any], error: Exception) -> None:
        assert self._delivery is not None
        pending = EventPending(1)
        pending.finish(error)
        version = msg.get("version") if isinstance(msg.get("version"), int) else -1
        index = msg.get("index") if isinstance(msg.get("index"), int) else -1
        self._delivery.bucket(version, index, memoryview(b""), pending)

    def _on_lost(self, reason: str) -> None:
        for g in self._groups.values():
            retire_pg(g.pg)
        self._groups.clear()
        self._store = None
        if self._delivery is not None:
            self._delivery.lost(reason)


__all__ = ["TorchPublisher", "TorchReceiver", "run_autotune"]
