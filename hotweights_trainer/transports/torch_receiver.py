"""Receiver side of the ``torch`` transport (:mod:`.torchdist` describes the whole transport).

A :class:`TorchReceiver` connects to the publisher's control channel, joins the broadcast groups it is
told to join (on a thread of its own, so frames of later versions keep flowing while a group forms or
a retired one is freed), posts its side of each broadcast as soon as the ``bucket`` message arrives and
hands buckets to the engine in order.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Any, Callable, ClassVar, Optional

from ..config import SyncConfig
from ..errors import PeerLostError, WireFormatError
from . import tcp
from .base import ReceiverHandler
from .buffers import ReceivePool
from .control_channel import ClientReceiver, ControlClient
from .delivery import EventPending, OrderedDelivery
from .endpoint import Endpoint
from .torch_backends import device_for, local_backends, make_group, usable
from .torch_collectives import (BroadcastGroup, DeviceStager, Forming, broadcast, check_endpoint, host_tensor,
                                require_torch_distributed, retire_group, run_autotune, wait_retired, watch)

log = logging.getLogger("hotweights_trainer.transports.torchdist")


class TorchReceiver(ClientReceiver):
    name: ClassVar[str] = "torch"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        check_endpoint(endpoint)
        require_torch_distributed()
        super().__init__(endpoint, config)
        self._pool = ReceivePool(config.bucket_bytes)
        self._client: Optional[ControlClient] = None
        self._delivery: Optional[OrderedDelivery] = None
        self._groups: dict[int, BroadcastGroup] = {}
        self._forming: dict[int, Forming] = {}
        self._joins: list[threading.Thread] = []
        self._glock = threading.Lock()  # _groups, _forming and _store: the control and joining threads
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
        self._retire_all()
        deadline = time.monotonic() + self.config.timeout_s
        for thread in self._joins:  # a group still forming is retired when it forms; then freed
            thread.join(max(0.0, deadline - time.monotonic()))
        wait_retired(max(0.0, deadline - time.monotonic()))

    def _retire_all(self) -> None:
        with self._glock:
            groups = list(self._groups.values())
            self._groups.clear()
            for f in self._forming.values():
                f.cancelled = True
            self._forming.clear()
            self._store = None
        for g in groups:
            retire_group(g)

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
                    epoch = tcp.field(msg, "epoch", int, minimum=0)
                    with self._glock:
                        g = self._groups.pop(epoch, None)
                        forming = self._forming.get(epoch)
                        if forming is not None:
                            forming.cancelled = True
                    if g is not None:
                        retire_group(g)
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
        """Check a ``tx/group`` message, then join the group on a thread of its own (:class:`Forming`)."""
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
        forming = Forming(epoch, backend)
        with self._glock:
            self._forming[epoch] = forming
        thread = threading.Thread(target=self._join, args=(forming, rank, size, port, autotune),
                                  name=f"hotweights-group-{epoch}", daemon=True)
        thread.start()  # before close() can see it: joining a thread not yet started raises
        self._joins = [t for t in self._joins if t.is_alive()] + [thread]

    def _join(self, forming: Forming, rank: int, size: int, port: int,
              autotune: Optional[dict[str, Any]]) -> None:
        import torch.distributed as dist

        epoch, backend = forming.epoch, forming.backend
        group: Optional[BroadcastGroup] = None
        error: Optional[BaseException] = None
        store = None
        try:
            with self._glock:
                store = self._store if self._store_port == port else None
            if store is None:  # connecting may wait for the store's timeout: not under the lock
                store = dist.TCPStore(self.endpoint.host, port, None, False,
                                      datetime.timedelta(seconds=self.config.timeout_s))
                with self._glock:
                    self._store, self._store_port = store, port
            pg = make_group(backend, dist.PrefixStore(f"hotweights/{epoch}/", store), rank, size,
                            self.config.timeout_s, self._local_ip)
            group = BroadcastGroup(epoch, (), pg, backend)
            if backend != "gloo":  # pragma: no cover - needs a GPU/XPU
                group.stager = DeviceStager(device_for(backend), 32 << 20)
            log.debug("joined %s broadcast group %d as rank %d of %d", backend, epoch, rank, size)
            if autotune is not None:
                try:
                    run_autotune(pg, autotune, root=False, stager=group.stager)
                except Exception as exc:  # noqa: BLE001 - a failed autotune breaks only this group
                    log.warning("broadcast autotune in group %d failed: %s", epoch, exc)
        except Exception as exc:  # noqa: BLE001 - the publisher sees the same failure and aborts; log ours
            log.warning("could not join broadcast group %d: %s", epoch, str(exc).splitlines()[0][:300])
            if group is not None:
                retire_group(group)
                group = None
            error = PeerLostError(f"could not join broadcast group {epoch}: {str(exc).splitlines()[0][:300]}")
        with self._glock:
            if error is not None and store is not None and self._store is store:
                self._store = None  # reconnect next time
            if group is not None and not forming.cancelled:
                self._groups[epoch] = group
            elif group is not None:
                retire_group(group)
                group, error = None, PeerLostError(f"broadcast group {epoch} was retired while it formed")
        forming.finish(group, error)
        with self._glock:  # only now: a bucket that finds no Forming must find every earlier one started
            if self._forming.get(epoch) is forming:
                del self._forming[epoch]

    def _recv_bucket(self, msg: dict[str, Any]) -> None:
        assert self._delivery is not None
        length, chunk = tcp.bucket_geometry(msg)
        handle = msg["handle"]
        prefix, _, epoch_text = handle.partition(":")
        if prefix != "torch" or not epoch_text.isdigit():
            raise WireFormatError(f"bucket handle {handle!r} is not a torch group handle")
        epoch = int(epoch_text)
        with self._glock:
            group = self._groups.get(epoch)
            forming = self._forming.get(epoch)
        if group is None and forming is None:
            self._failed_bucket(msg, PeerLostError(f"bucket for broadcast group {epoch}, which this receiver "
                                                   "is not in"))
            return
        backend = group.backend if group is not None else forming.backend
        version, index = msg["version"], msg["index"]
        hbuf = self._pool.lend(version, length)
        tensor = host_tensor(hbuf)
        parts = tcp.chunks(length, chunk)
        data: Any = hbuf.mem[:length]
        dev = None
        if backend == "nccl":  # pragma: no cover - needs a GPU
            dev = self._device_buffer(version, length)
            data = self._device_bucket(dev, data)
        pending = EventPending(len(parts) if backend == "gloo" else 1)

        def start(g: Optional[BroadcastGroup], error: Optional[BaseException]) -> None:
            try:
                if error is not None or g is None or g.pg is None:
                    raise error or PeerLostError(f"broadcast group {epoch} was retired")
                if g.stager is None:
                    for off, size in parts:
                        watch(broadcast(g.pg, tensor[off:off + size]), pending)
                    return
                if dev is not None:  # pragma: no cover - device backends
                    g.stager.receive_into(g.pg, dev, tensor, length, chunk)
                else:  # pragma: no cover
                    g.stager.run(g.pg, tensor, length, chunk, root=False)
                pending.finish()
            except Exception as exc:  # noqa: BLE001 - a dead group raises at once; fail this bucket
                pending.finish(exc)

        hbuf.busy = lambda: not pending.done()
        self._delivery.bucket(version, index, data, pending, on_abandon=lambda: self._pool.forget(hbuf))
        if forming is None or not forming.defer(start):
            with self._glock:
                group = self._groups.get(epoch)
            start(group, None)

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
        from ..receive.device_bucket import DeviceBucket
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
        self._retire_all()
        if self._delivery is not None:
            self._delivery.lost(reason)


__all__ = ["TorchReceiver"]
