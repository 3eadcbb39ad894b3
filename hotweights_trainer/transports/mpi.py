"""``mpi`` transport (``mpi://``): the MPI world started by ``mpirun``; rank 0 publishes, the others receive.

- **Control**: framed JSON messages (the same ops as every transport) as point-to-point MPI messages
  on ``COMM_WORLD`` with a reserved tag (:data:`CTRL_TAG`). Receivers may start before or after
  rank 0's publisher; a hello waits in MPI's queue until the publisher reads it.
- **Groups**: buckets are broadcast over a communicator holding rank 0 plus exactly the receivers
  they go to. It is created with ``MPI_Comm_create_group``, which is collective over *its members
  only*, so a rank outside the group -- busy, late, or not receiving at all -- can never deadlock it.
  Creation is a three-step handshake so no rank ever blocks in it alone: the publisher sends
  ``tx/group``; each member answers ``tx/ready`` and waits; only when all answered (within
  ``timeout_s``) does the publisher send ``tx/go`` and every member, and rank 0, create the
  communicator; otherwise it sends ``tx/ungroup`` and nobody does. The last few groups are cached
  (the steady membership plus a catch-up group for a late joiner).
- **Buckets**: non-blocking broadcasts (``Ibcast``) in ``mpi_chunk_mb`` chunks (``--mpi-chunk-mb``),
  with a window of ``mpi_window`` buckets in flight (``--window``) plus the shared byte cap and
  adaptation of :mod:`.window`. Receivers post their side as soon as the ``bucket`` message arrives,
  into pre-faulted reused buffers, and hand buckets to the engine in order (:mod:`.delivery`).
- **Threads** (:mod:`.mpi_progress`): one thread per process makes every MPI call of the transport
  (MPI must provide ``MPI_THREAD_MULTIPLE``, since the application's own thread may call MPI too); engine callbacks
  run on a separate thread, so a callback that posts (catch-up) never blocks MPI progress.
- **Fault model**: a rank that dies ends the MPI job (``mpirun`` kills the others), so a dead
  receiver costs the publisher its job, not a hang; a receiver that stalls is evicted after
  ``timeout_s`` like on every transport. Late joiners are supported: a rank that creates its
  ``WeightReceiver`` later catches up on the current version through a group of its own.

Control messages use ``COMM_WORLD`` tags :data:`CTRL_TAG` and :data:`GROUP_TAG`; an application
receiving with ``MPI.ANY_TAG`` on ``COMM_WORLD`` at the same time would steal them.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

from ..config import SyncConfig
from ..errors import EndpointError, PeerLostError, SyncTimeoutError, WireFormatError
from ..wire import messages
from . import tcp
from .base import (BucketBuffer, PublisherHandler, PublisherTransport, ReceiverHandler,
                   ReceiverTransport, TransportStats)
from .buffers import HostBufferPool, ReceivePool, numpy_view
from .delivery import EventPending, OrderedDelivery
from .endpoint import Endpoint
from .meter import TransportMeter
from .mpi_progress import CTRL_TAG, GROUP_TAG, MpiThread
from .window import InflightWindow, WindowGate

log = logging.getLogger(__name__)

_GROUPS_KEPT = 3


def _check_endpoint(endpoint: Endpoint) -> None:
    if endpoint.scheme != "mpi":
        raise EndpointError(f"the mpi transport needs the mpi:// endpoint, got {endpoint}")


@dataclass
class _Formation:
    epoch: int
    ranks: tuple[int, ...]
    future: Future
    deadline: float
    ready: set[int] = field(default_factory=set)


@dataclass
class _Group:
    epoch: int
    ranks: tuple[int, ...]
    comm: Any
    broken: Optional[str] = None
    flights: list = field(default_factory=list)


@dataclass
class _Flight:
    nbytes: int
    t0: float
    pending: EventPending
    group: _Group
    settled: bool = False


class MpiPublisher(PublisherTransport):
    name: ClassVar[str] = "mpi"
    zero_copy: ClassVar[bool] = False
    multi_receiver: ClassVar[bool] = True
    cross_host: ClassVar[bool] = True
    addressable: ClassVar[bool] = True
    late_join: ClassVar[bool] = True
    pipelined: ClassVar[bool] = True
    survives_receiver_death: ClassVar[bool] = False
    limits: ClassVar[dict[str, str]] = {
        "zero_copy": "bytes are broadcast into each receiver's own buffer",
        "survives_receiver_death": "a rank that dies ends the whole MPI job (mpirun kills the other ranks): "
                                   "bounded, but the publisher does not outlive it",
    }

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        super().__init__(endpoint, config)
        self._mt = MpiThread("pub", self._on_ctl, config.max_message_bytes)
        if self._mt.rank != 0:
            raise EndpointError(f"mpi:// publishes from rank 0 only; this process is rank {self._mt.rank} "
                                "(create a WeightReceiver here instead)")
        self._pool = HostBufferPool(config.bucket_bytes)
        self._gate = WindowGate(InflightWindow.from_config(config, base=config.mpi_window),
                                timeout_s=config.timeout_s, name="mpi://")
        self._meter = TransportMeter("mpi", str(endpoint), self._gate)
        self._chunk = config.mpi_chunk_mb << 20
        self._handler: Optional[PublisherHandler] = None
        self._rank_of: dict[str, int] = {}
        self._rid_of: dict[int, str] = {}
        self._groups: collections.OrderedDict[tuple[int, ...], _Group] = collections.OrderedDict()
        self._forming: dict[int, _Formation] = {}
        self._epoch = 0
        self._lock = threading.RLock()
        self._closed = False
        # Tags this publisher's messages, so a receiver ignores a goodbye that an earlier publisher
        # on rank 0 left in MPI's queue.
        self._inst = secrets.randbits(48)

    def start(self, handler: PublisherHandler) -> None:
        self._handler = handler
        self._mt.on_error = handler.on_error
        self._mt.tickers.append(self._check_formations)
        self._mt.tickers.append(handler.on_tick)
        self._mt.start()
        log.info("mpi transport: publisher on rank 0 of %d (window %d, chunk %d MiB)", self._mt.size,
                 self.config.mpi_window, self._chunk >> 20)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ranks = list(self._rid_of)
        for r in ranks:
            self._mt.send_ctl(r, {"op": "tx", "kind": "bye", "reason": "publisher closed", "inst": self._inst})
        self._mt.stop(self.config.timeout_s)
        self._pool.clear()

    # ---------------------------------------------------------------- buckets
    def alloc(self, nbytes: int) -> BucketBuffer:
        buf = self._pool.get(nbytes)
        return BucketBuffer(mem=buf.mem, handle="mpi", capacity=buf.size, owner=buf)

    def post(self, to: Sequence[str], version: int, index: int, buf: BucketBuffer) -> None:
        with self._lock:
            ranks = tuple(sorted(self._rank_of[rid] for rid in to if rid in self._rank_of))
        if not ranks:
            return
        n = buf.length
        group = self._group_for(ranks)
        self._gate.acquire(n)
        flight = _Flight(n, time.perf_counter(), EventPending(), group)
        arr = numpy_view(buf.owner)
        parts = tcp.chunks(n, self._chunk)
        flight.pending = EventPending(len(parts), on_done=lambda _p: self._settle(flight))
        msg = {"op": "bucket", "version": version, "index": index, "handle": f"mpi:{group.epoch}", "offset": 0,
               "length": n, "chunk": self._chunk}

        def start() -> None:
            if group.broken:
                raise PeerLostError(f"broadcast group {group.epoch} is broken: {group.broken}")
            data = messages.encode(msg)[4:]
            for r in group.ranks[1:]:
                self._mt._isend(r, data)
            reqs = [group.comm.Ibcast([arr[off:off + size], self._mt.MPI.BYTE], root=0) for off, size in parts]
            self._mt.track(reqs, flight.pending)
            group.flights.append(flight)

        try:
            self._mt.submit(start).result(self.config.timeout_s)
        except BaseException:
            self._gate.release(n, 0.0)
            raise
        buf.owner.busy = lambda: not flight.pending.done()

    def _settle(self, flight: _Flight) -> None:
        if flight.settled:
            return
        flight.settled = True
        if flight in flight.group.flights:
            flight.group.flights.remove(flight)  # (MPI thread, like every other use of .flights)
        dt = time.perf_counter() - flight.t0
        if flight.pending.error() is None:
            self._meter.moved(flight.nbytes, dt)
        self._gate.release(flight.nbytes, dt)

    def recycle(self, buf: BucketBuffer) -> None:
        self._pool.put(buf.owner)

    def send(self, to: Sequence[str], msg: dict[str, Any]) -> list[str]:
        missing = []
        with self._lock:
            ranks = []
            for rid in to:
                r = self._rank_of.get(rid)
                if r is None:
                    missing.append(rid)
                else:
                    ranks.append(r)
        if msg["op"] == "welcome":
            msg = {**msg, "inst": self._inst}
        for r in ranks:
            self._mt.send_ctl(r, msg)
        return missing

    def drop(self, rid: str, reason: str) -> None:
        with self._lock:
            rank = self._rank_of.get(rid)
        if rank is None:
            return
        self._mt.send_ctl(rank, {"op": "tx", "kind": "drop", "reason": reason[:500], "inst": self._inst})
        self._lost(rank, f"evicted: {reason}")

    def stats(self) -> TransportStats:
        self._meter.refresh()
        return self._meter.stats

    # ---------------------------------------------------------------- groups
    def _group_for(self, ranks: tuple[int, ...]) -> _Group:
        with self._lock:
            g = self._groups.get(ranks)
            if g is not None and not g.broken:
                self._groups.move_to_end(ranks)
                return g
            if g is not None:
                self._retire(self._groups.pop(ranks))
            self._epoch += 1
            epoch = self._epoch
        form = _Formation(epoch, ranks, Future(), time.monotonic() + self.config.timeout_s)

        def begin() -> None:
            self._forming[epoch] = form
            for r in ranks:
                self._mt._isend(r, messages.encode({"op": "tx", "kind": "group", "epoch": epoch,
                                                    "ranks": [0, *ranks]})[4:])

        self._mt.submit(begin).result(self.config.timeout_s)
        try:
            comm = form.future.result(self.config.timeout_s + 1.0)
        except TimeoutError:
            raise SyncTimeoutError(f"broadcast group {epoch} for ranks {list(ranks)} did not form") from None
        group = _Group(epoch, (0, *ranks), comm)
        with self._lock:
            self._groups[ranks] = group
            while len(self._groups) > _GROUPS_KEPT:
                self._retire(self._groups.popitem(last=False)[1])
        log.info("mpi transport: formed broadcast group %d with rank(s) %s", epoch, list(ranks))
        return group

    def _on_ready(self, rank: int, epoch: int) -> None:
        """(MPI thread) a member is ready; when all are, everyone creates the communicator."""
        form = self._forming.get(epoch)
        if form is None or rank not in form.ranks:
            return
        form.ready.add(rank)
        if form.ready == set(form.ranks):
            del self._forming[epoch]
            for r in form.ranks:
                self._mt._isend(r, messages.encode({"op": "tx", "kind": "go", "epoch": epoch})[4:])
            try:
                form.future.set_result(self._mt.create_group((0, *form.ranks)))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting post() as a typed error
                form.future.set_exception(PeerLostError(f"MPI_Comm_create_group failed: {exc}"))

    def _check_formations(self) -> None:
        """(MPI thread, every tick) cancel formations whose members did not answer in time."""
        now = time.monotonic()
        for epoch, form in list(self._forming.items()):
            missing = sorted(set(form.ranks) - form.ready)
            gone = [r for r in missing if r not in self._rid_of]
            if now > form.deadline or gone:
                del self._forming[epoch]
                for r in form.ranks:
                    self._mt._isend(r, messages.encode({"op": "tx", "kind": "ungroup", "epoch": epoch})[4:])
                form.future.set_exception(SyncTimeoutError(
                    f"rank(s) {missing} did not join broadcast group {epoch} within {self.config.timeout_s:.1f}s"
                    if not gone else f"rank(s) {gone} left while broadcast group {epoch} was forming"))

    def _retire(self, group: _Group) -> None:
        group.broken = group.broken or "retired"
        for r in group.ranks[1:]:
            self._mt.send_ctl(r, {"op": "tx", "kind": "ungroup", "epoch": group.epoch})

        def drop_flights() -> None:
            # Broadcasts that can no longer complete (a member left) free their window slots now;
            # their buffers stay out of the pool for good, since MPI may still touch them.
            for f in group.flights:
                if not f.pending.done():
                    self._mt.forget(f.pending)
                    f.pending.finish(PeerLostError(f"broadcast group {group.epoch} retired"))
            group.flights.clear()

        self._mt.submit(drop_flights)

    # ---------------------------------------------------------------- control (MPI thread)
    def _on_ctl(self, rank: int, msg: dict[str, Any]) -> None:
        assert self._handler is not None
        op = msg["op"]
        if op == "hello":
            rid = msg["receiver_id"]
            with self._lock:
                old = self._rid_of.get(rank)
            if old is not None:
                self._lost(rank, "rejoined")
            with self._lock:
                if rid in self._rank_of:
                    rid = f"{rid}#r{rank}"
                self._rid_of[rank] = rid
                self._rank_of[rid] = rank
            self._handler.on_join(rid, msg)
            return
        rid = self._rid_of.get(rank)
        if rid is None:
            return  # not joined (or already evicted): nothing it says matters
        if op == "tx":
            kind = msg["kind"]
            if kind == "ready":
                try:
                    self._on_ready(rank, tcp.field(msg, "epoch", int, minimum=0))
                except WireFormatError as exc:
                    log.warning("rank %d: %s", rank, exc)
            elif kind == "bye":
                self._lost(rank, "receiver closed")
            return
        self._handler.on_message(rid, msg)

    def _lost(self, rank: int, reason: str) -> None:
        assert self._handler is not None
        with self._lock:
            rid = self._rid_of.pop(rank, None)
            if rid is None:
                return
            self._rank_of.pop(rid, None)
            for key, g in list(self._groups.items()):
                if rank in key:
                    self._retire(self._groups.pop(key))
        self._handler.on_lost(rid, reason)


class MpiReceiver(ReceiverTransport):
    name: ClassVar[str] = "mpi"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _check_endpoint(endpoint)
        super().__init__(endpoint, config)
        self._mt = MpiThread("rx", self._on_ctl, config.max_message_bytes)
        if self._mt.rank == 0:
            raise EndpointError("mpi:// receives on ranks 1..N-1; rank 0 is the publisher")
        self._pool = ReceivePool(config.bucket_bytes)
        self._delivery: Optional[OrderedDelivery] = None
        self._hello: Optional[Callable[[], dict[str, Any]]] = None
        self._groups: dict[int, Any] = {}
        self._waiting: dict[int, list[int]] = {}  # epochs we said ready for, awaiting go/ungroup
        # Buckets whose broadcasts are posted but not complete, at most mpi_window (--window); the
        # rest wait here in order. Bounds what a receiver takes on ahead of its engine.
        self._active: dict[EventPending, int] = {}  # posted, not complete -> group epoch
        self._deferred: collections.deque[tuple[int, EventPending, Callable[[], None]]] = collections.deque()
        self._connected = False
        self._closed = False
        self._inst: Optional[int] = None  # the publisher instance that welcomed us

    def start(self, handler: ReceiverHandler, hello: Callable[[], dict[str, Any]]) -> None:
        self._delivery = OrderedDelivery(handler, timeout_s=self.config.timeout_s, name=f"mpi-{self._mt.rank}")
        self._mt.on_error = handler.on_error
        self._hello = hello
        self._mt.start()
        self._mt.send_ctl(0, hello())

    @property
    def connected(self) -> bool:
        return self._connected

    def send(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "release":
            self._pool.release(msg["version"])
        if not self._connected:
            raise PeerLostError("not connected to the publisher (rank 0)")
        self._mt.send_ctl(0, msg)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A group we promised to join must be resolved first, or rank 0 would wait for us.
        deadline = time.monotonic() + self.config.timeout_s
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        self._mt.send_ctl(0, {"op": "tx", "kind": "bye"})
        self._mt.stop(self.config.timeout_s)
        if self._delivery is not None:
            self._delivery.close()

    # ---------------------------------------------------------------- control (MPI thread)
    def _on_ctl(self, rank: int, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        if rank != 0:
            log.warning("ignoring a control message from rank %d (only rank 0 publishes)", rank)
            return
        op = msg["op"]
        try:
            if op == "tx":
                self._on_tx(msg)
                return
            if op == "bucket":
                self._recv_bucket(msg)
                return
        except WireFormatError as exc:
            log.warning("malformed %r message from rank 0: %s", op, exc)
            return
        if op == "welcome":
            self._connected = True
            self._inst = msg.get("inst")
            self._delivery.connected({})
        elif op == "abort":
            self._delivery.abandon(msg["version"])
        self._delivery.frame(msg)

    def _on_tx(self, msg: dict[str, Any]) -> None:
        kind = msg["kind"]
        if kind == "group":
            epoch = tcp.field(msg, "epoch", int, minimum=0)
            ranks = msg.get("ranks")
            if not (isinstance(ranks, list) and ranks and ranks[0] == 0 and self._mt.rank in ranks
                    and all(isinstance(r, int) and 0 <= r < self._mt.size for r in ranks)
                    and len(set(ranks)) == len(ranks)):
                raise WireFormatError(f"tx/group {epoch}: invalid rank list {ranks!r}")
            self._waiting[epoch] = ranks
            self._mt._isend(0, messages.encode({"op": "tx", "kind": "ready", "epoch": epoch})[4:])
        elif kind == "go":
            epoch = tcp.field(msg, "epoch", int, minimum=0)
            ranks = self._waiting.pop(epoch, None)
            if ranks is not None:
                self._groups[epoch] = self._mt.create_group(ranks)
                log.debug("rank %d joined broadcast group %d %s", self._mt.rank, epoch, ranks)
        elif kind == "ungroup":
            epoch = tcp.field(msg, "epoch", int, minimum=0)
            self._waiting.pop(epoch, None)
            comm = self._groups.pop(epoch, None)
            self._retire(epoch)
            if comm is not None:
                comm.Free()
        elif kind in ("bye", "drop"):
            if self._inst is None or msg.get("inst") != self._inst:
                return  # from an earlier publisher on rank 0, or before we were welcomed
            self._inst = None
            reason = msg.get("reason") if isinstance(msg.get("reason"), str) else kind
            self._connected = False
            self._delivery.lost(f"{'publisher closed' if kind == 'bye' else 'evicted by the publisher'}: {reason}")
            self._groups.clear()
            self._retire(None)
            if not self._closed and self._hello is not None:
                self._mt._isend(0, messages.encode(self._hello())[4:])  # ready for the next publisher

    def _recv_bucket(self, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        length, chunk = tcp.bucket_geometry(msg)
        prefix, _, epoch_text = msg["handle"].partition(":")
        if prefix != "mpi" or not epoch_text.isdigit():
            raise WireFormatError(f"bucket handle {msg['handle']!r} is not an mpi group handle")
        comm = self._groups.get(int(epoch_text))
        version, index = msg["version"], msg["index"]
        if comm is None:
            pending = EventPending(1)
            pending.finish(PeerLostError(f"bucket for broadcast group {epoch_text}, which this rank is not in"))
            self._delivery.bucket(version, index, memoryview(b""), pending)
            return
        hbuf = self._pool.lend(version, length)
        arr = numpy_view(hbuf)
        parts = tcp.chunks(length, chunk)
        pending = EventPending(len(parts), on_done=self._bucket_done)
        hbuf.busy = lambda: not pending.done()
        epoch = int(epoch_text)

        def post() -> None:
            self._active[pending] = epoch
            reqs = [comm.Ibcast([arr[off:off + size], self._mt.MPI.BYTE], root=0) for off, size in parts]
            self._mt.track(reqs, pending)

        if len(self._active) < self.config.mpi_window and not self._deferred:
            post()
        else:
            self._deferred.append((epoch, pending, post))
        # Queued for the engine now, so control messages after it keep their order.
        self._delivery.bucket(version, index, hbuf.mem[:length], pending, on_abandon=lambda: self._pool.forget(hbuf))

    def _bucket_done(self, pending: EventPending) -> None:
        """(MPI thread) a bucket's broadcasts completed: post the next deferred one."""
        self._active.pop(pending, None)
        while self._deferred and len(self._active) < self.config.mpi_window:
            self._deferred.popleft()[2]()

    def _retire(self, epoch: Optional[int]) -> None:
        """(MPI thread) forget the broadcasts of group ``epoch`` (all when None): they will not complete."""
        gone = PeerLostError("broadcast group retired")
        dropped = [item for item in self._deferred if epoch is None or item[0] == epoch]
        self._deferred = collections.deque(item for item in self._deferred if item not in dropped)
        for item in dropped:
            item[1].finish(gone)
        for pending, e in list(self._active.items()):
            if epoch is None or e == epoch:
                self._mt.forget(pending)
                self._active.pop(pending, None)
                pending.finish(gone)


__all__ = ["MpiPublisher", "MpiReceiver", "CTRL_TAG", "GROUP_TAG"]
