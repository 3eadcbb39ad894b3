"""The transport contract: how buckets and control messages move between one publisher and its receivers.

The engine (``publisher.py`` / ``receiver.py``) owns versions, checksums, the two-phase commit and
applying weights. A transport only moves opaque bucket blobs and small control messages, so every
transport gets the same guarantees for free. The lifecycle, and which side calls what:

1. **Rendezvous.** The publisher engine calls ``PublisherTransport.start(events)``; the transport
   binds/listens/joins its group and from then on reports to ``events`` (a :class:`PublisherHandler`)
   ``on_join(rid, hello)`` for every receiver it admitted (late joiners included),
   ``on_message(rid, msg)`` for every control message a receiver sends, ``on_lost(rid, reason)`` when
   one goes away, ``on_tick()`` about every ``TICK_S`` seconds and ``on_error(error, where)`` when
   its own code raised on its thread. Each receiver engine calls
   ``ReceiverTransport.start(handler, hello)``; the transport connects in the background (retrying,
   so receivers may start before the publisher), sends ``hello()`` on every (re)connect and calls
   ``handler.on_connected()`` / ``on_message(msg)`` / ``on_bucket(...)`` / ``on_lost(reason)``, and
   ``handler.on_error(error, where)`` when a handler call or its own code raised.
2. **Announce a version.** The publisher engine calls ``send(to, {"op": "begin", ...})``.
3. **Move buckets.** For each bucket the publisher engine calls ``alloc(nbytes)`` to get a writable
   buffer, ``pack(buf, plan, ...)`` (by default: into ``buf.mem`` on the host; a transport that keeps
   buckets in device memory packs there) and ``post(to, version, index, buf)``. ``post`` may
   return before the bytes have arrived (pipelining), but must respect the in-flight window and never
   block past ``config.timeout_s``. On the receiver, the transport calls
   ``handler.on_bucket(version, index, data)`` with the bucket bytes, in posting order per receiver
   (or ``handler.on_bucket_failed(version, index, error)`` when the bytes could not be obtained).
   ``data`` stays valid until the receiver engine sends ``release`` for that version (zero-copy
   transports hand out views of shared memory; the others hand over a private buffer).
4. **Ack.** The publisher engine sends ``end``; each receiver engine verifies every bucket and replies
   with ``send({"op": "staged"})`` or ``send({"op": "nack", ...})``.
5. **Commit.** Once every receiver of the version has staged, the publisher engine sends ``commit``
   (or ``abort``). Receivers apply a committed version when their owner calls ``poll``, then send
   ``release``. The publisher engine calls ``recycle(buf)`` for buffers nobody references any more.
6. **Close.** ``close()`` on either side ends it; peers see ``on_lost``. ``drop(rid, reason)`` lets the
   publisher engine evict one receiver (e.g. one that missed a deadline).

Must implement: ``start``, ``alloc``, ``post``, ``send``, ``recycle``, ``drop``, ``close`` (publisher)
and ``start``, ``send``, ``close`` (receiver). Optional: ``stats``.

Threading, publisher side. Three kinds of thread meet here:

- the transport's own threads (control server, MPI progress, UCX pump) read what receivers send.
  For each receiver event they first run the transport's own bookkeeping, the *control hooks* below,
  then report the event to ``events``. ``events`` is the engine's queue: each of its methods only
  enqueues, never blocks and never raises, so a transport may call it from any thread, holding any
  of its own locks;
- the engine thread (:mod:`hotweights_trainer.engine`) drains that queue in order. It alone owns the
  version and receiver records, and it calls ``send``, ``post``, ``drop``, ``recycle`` and
  ``discard``, never while holding a lock;
- the caller's thread (``publish``) calls ``alloc`` and ``pack`` (and ``delivery_error``, a query),
  also without any lock held.

So ``alloc``/``pack`` may run at the same time as ``post``/``send`` and must be thread-safe against
them; ``post`` may block (a full in-flight window) but never past ``config.timeout_s``, and nothing a
post waits for may depend on the engine thread: acks that free window slots are the transport's
own bookkeeping, done on its own thread. Control hooks (called on the transport's control thread,
before the engine event; defaults do nothing):

- ``admit(rid, hello) -> bool``: a receiver said hello. False refuses it (the transport drops it
  itself); the engine then never hears of it.
- ``on_transport_message(rid, msg)``: a frame with ``op: tx``, the transport's own protocol (acks,
  group formation); these never reach the engine.
- ``forget(rid)``: the receiver is gone; before the engine's ``on_lost``.
- ``housekeep()``: every ``TICK_S``, before the engine's ``on_tick``.

A hook that raises is reported as ``events.on_error``: the engine fails the version in flight with
it. Receiver side: ``handler`` callbacks run on the transport's thread (or its ordered delivery
thread, :mod:`.delivery`) in the publisher's order; ``send`` may be called from the owner's thread at
the same time and must be thread-safe. No call may block forever: every wait takes its deadline from
``config.timeout_s``.

Capabilities are class attributes: ``zero_copy`` (receivers read the publisher's buffer directly),
``multi_receiver`` (one publisher feeds several receivers), ``cross_host`` (peers on other hosts),
``addressable`` (``to`` may name a subset of receivers, which late-join catch-up needs),
``late_join`` (a receiver may start after versions were committed and catches up),
``pipelined`` (``post`` returns before the bytes arrived; the in-flight window and byte cap of
:mod:`.window` bound what is outstanding) and ``survives_receiver_death`` (a receiver that dies
mid-version costs the publisher a bounded error or an eviction; false where the launcher's fault
model ends the whole job instead, as MPI's does). ``limits`` says in words why a capability is
missing, so tests and ``hotweights doctor`` can report it instead of silently skipping.

Choosing one: ``SyncConfig.transport`` / ``HOTWEIGHTS_TRANSPORT`` is ``auto``, ``shm``, ``torch``,
``mpi``, ``ucx`` or ``cuda_ipc``; ``auto`` is decided in :mod:`.select`. The rendezvous comes from the
endpoint: ``shm://NAME`` (same host), ``tcp://HOST:PORT`` (``torch`` and ``ucx``: the publisher
listens there, receivers connect) and ``mpi://`` (the MPI world: rank 0 publishes, the other ranks
receive). Subset groups (``torch``, ``mpi``) are always created collectively by exactly their
members, never by a subset of an existing world, so a receiver that is busy, late or gone can never
hold up a group it is not in.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

from ..config import SyncConfig
from .endpoint import Endpoint

TICK_S = 0.2


class PublisherHandler(Protocol):
    """The publisher engine's event queue (:class:`hotweights_trainer.engine.EventQueue`). Called
    from any transport thread; every method only enqueues a typed event and returns at once."""

    def on_join(self, rid: str, hello: dict[str, Any]) -> None:
        """A receiver the transport admitted said ``hello``."""

    def on_message(self, rid: str, msg: dict[str, Any]) -> None:
        """A control message for the engine (every op but the transport's own ``tx``)."""

    def on_lost(self, rid: str, reason: str) -> None:
        """A receiver went away (closed, dropped, broken connection); after ``forget(rid)``."""

    def on_tick(self) -> None:
        """About every ``TICK_S`` seconds (coalesced while the engine is busy)."""

    def on_error(self, error: BaseException, where: str) -> None:
        """The transport's own code raised on its thread; fails the version in flight."""


class ReceiverHandler(Protocol):
    """Implemented by the receiver engine; called from the transport's thread."""

    def on_connected(self, info: dict[str, Any]) -> None: ...

    def on_message(self, msg: dict[str, Any]) -> None: ...

    def on_bucket(self, version: int, index: int, data: memoryview) -> None: ...

    def on_bucket_failed(self, version: int, index: int, error: Exception) -> None: ...

    def on_lost(self, reason: str) -> None: ...

    def on_error(self, error: BaseException, where: str) -> None:
        """A handler call or the transport's own code raised on a transport thread: the receiver
        engine fails what it was staging and raises it from ``poll``/``wait_for_version``."""


@dataclass
class BucketBuffer:
    """A writable buffer the publisher packs one bucket into.

    ``handle`` names it for the receivers (an shm segment name, a CUDA-IPC handle, or an index for
    transports that copy). ``length`` is set by the engine once packed.
    """

    mem: memoryview
    handle: str
    capacity: int
    length: int = 0
    owner: Any = None


@dataclass
class TransportStats:
    """Measured counters; every value comes from real transfers."""

    bytes_posted: int = 0
    buckets_posted: int = 0
    seconds_posting: float = 0.0
    retries: int = 0
    inflight_buckets: int = 0
    inflight_bytes: int = 0
    inflight_buckets_high: int = 0
    inflight_bytes_high: int = 0
    window: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class PublisherTransport(abc.ABC):
    name: ClassVar[str] = "?"
    zero_copy: ClassVar[bool] = False
    multi_receiver: ClassVar[bool] = True
    cross_host: ClassVar[bool] = False
    addressable: ClassVar[bool] = True
    late_join: ClassVar[bool] = True
    pipelined: ClassVar[bool] = False
    survives_receiver_death: ClassVar[bool] = True
    supports_delta: ClassVar[bool] = True
    """Buckets are host bytes the delta encoder can fill; False where they live in device memory."""
    limits: ClassVar[dict[str, str]] = {}

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        self.endpoint = endpoint
        self.config = config

    def pack(self, buf: BucketBuffer, plan: Any, *, version: int, index: int, session: int, flags: int = 0) -> int:
        """Write bucket ``plan`` (a :class:`~hotweights_trainer.wire.packer.PlannedBucket`) into ``buf``;
        returns its length. The default packs into ``buf.mem`` on the host."""
        from ..wire.packer import pack_into

        return pack_into(buf.mem, plan, version=version, index=index, session=session, flags=flags)

    @abc.abstractmethod
    def start(self, handler: PublisherHandler) -> None:
        """Rendezvous. Returns once receivers can connect; joins are reported via the handler."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> BucketBuffer:
        """A buffer of at least ``nbytes`` to pack a bucket into (may wait for a free one, bounded)."""

    @abc.abstractmethod
    def post(self, to: Sequence[str], version: int, index: int, buf: BucketBuffer) -> None:
        """Make bucket ``index`` of ``version`` (``buf.mem[:buf.length]``) reach receivers ``to``."""

    @abc.abstractmethod
    def send(self, to: Sequence[str], msg: dict[str, Any]) -> list[str]:
        """Send a control message; returns the receivers it could not reach (they are reported lost)."""

    @abc.abstractmethod
    def recycle(self, buf: BucketBuffer) -> None:
        """No receiver references ``buf`` any more; it may be reused or freed."""

    def discard(self, buf: BucketBuffer) -> None:
        """The handle of ``buf`` expired (a receiver never released it): free it for good rather than
        reuse it. Transports whose buffers are private copies just recycle."""
        self.recycle(buf)

    @abc.abstractmethod
    def drop(self, rid: str, reason: str) -> None:
        """Disconnect one receiver (eviction); its ``on_lost`` follows."""

    # Control hooks: called on the transport's control thread before the engine's event (see above).
    def admit(self, rid: str, hello: dict[str, Any]) -> bool:
        """A receiver said hello; False refuses it (this transport has dropped it)."""
        return True

    def on_transport_message(self, rid: str, msg: dict[str, Any]) -> None:
        """A message of this transport's own protocol (``op: tx``) from a receiver."""

    def forget(self, rid: str) -> None:
        """A receiver is gone: drop what this transport kept about it."""

    def housekeep(self) -> None:
        """Periodic bookkeeping, every ``TICK_S`` seconds."""

    def delivery_error(self, version: int) -> Optional[Exception]:
        """Why ``version`` can no longer reach every receiver it was posted to, once the transport
        learned it after ``post`` returned (a broadcast group that broke while its buckets were in
        flight); ``None`` otherwise. The engine asks while it waits for the version's decision and
        aborts the version at once instead of waiting out the deadline."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Stop, disconnect every receiver and free every buffer. Idempotent."""

    def stats(self) -> TransportStats:
        return TransportStats()

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "endpoint": str(self.endpoint), **capabilities(type(self))}


class ReceiverTransport(abc.ABC):
    name: ClassVar[str] = "?"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        self.endpoint = endpoint
        self.config = config

    @abc.abstractmethod
    def start(self, handler: ReceiverHandler, hello: Callable[[], dict[str, Any]]) -> None:
        """Connect in the background (retrying until closed); send ``hello()`` on every connect."""

    @abc.abstractmethod
    def send(self, msg: dict[str, Any]) -> None:
        """Send a control message to the publisher (raises PeerLostError when disconnected)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect and stop the background thread. Idempotent."""

    @property
    def connected(self) -> bool:
        return False


CAPABILITIES = ("zero_copy", "multi_receiver", "cross_host", "addressable", "late_join", "pipelined",
                "survives_receiver_death")


def capabilities(cls: type) -> dict[str, Any]:
    """The capability attributes of a publisher transport class, plus ``limits``."""
    out: dict[str, Any] = {name: bool(getattr(cls, name)) for name in CAPABILITIES}
    out["limits"] = dict(getattr(cls, "limits", {}))
    return out


__all__ = ["CAPABILITIES", "capabilities", "PublisherTransport", "ReceiverTransport", "PublisherHandler", "ReceiverHandler",
           "BucketBuffer", "TransportStats", "TICK_S", "Optional"]
