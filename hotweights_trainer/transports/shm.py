"""``shm://NAME``: the embedded default. POSIX shared memory carries the bytes, a Unix socket the protocol.

The publisher packs each bucket straight into a shared-memory block; receivers map the block
read-only and verify and stage it in place, so a bucket crosses memory once on the way in and once
when it is applied (zero-copy staging). One block holds one bucket; blocks are pre-faulted once and
reused across versions, because first-touch page faults are many times slower than a copy.

A block is reused only after every receiver released the version that used it and that version is
no longer the current one (late joiners read the current version from its blocks). Block names record
their owner (:mod:`.shm_blocks`): the publisher unlinks its blocks on close or at interpreter exit,
and after SIGKILL or ``os._exit`` the next hotweights process that starts, or a receiver that saw
its publisher die, reclaims them.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, ClassVar, Optional, Sequence

from ..config import SyncConfig
from ..errors import EndpointError, TransportUnavailableError, WireFormatError
from .base import (BucketBuffer, PublisherHandler, ReceiverHandler, TransportStats)
from ..control.handles import sign_handle, verify_handle
from .control_channel import ClientReceiver, ControlClient, ControlServer, ServedPublisher
from .endpoint import Endpoint
from .shm_blocks import block_name, parse_block_name, pid_alive, reclaim_dead_blocks

log = logging.getLogger(__name__)

try:
    import _posixshmem  # CPython's shm_open/shm_unlink, without multiprocessing's resource tracker
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_BLOCK_ALIGN = 2 << 20


def _require_posix() -> None:
    if _posixshmem is None:
        raise TransportUnavailableError("the shm transport needs POSIX shared memory (Linux or macOS)")


def control_address(name: str) -> str | bytes:
    """Where the publisher listens: an abstract Unix socket on Linux (no file to clean up)."""
    if sys.platform.startswith("linux"):
        return f"\0hotweights-shm/{name}"
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"hotweights-{name}.sock")


def _handle_parts(endpoint: Endpoint, msg: dict[str, Any]) -> tuple:
    return (str(endpoint), msg["version"], msg["index"], msg["handle"], msg["offset"], msg["length"])


class _Block:
    """One shared-memory block, created, pre-faulted and mapped read-write by the publisher."""

    def __init__(self, shm_name: str, size: int):
        self.shm_name = shm_name
        self.size = size
        fd = _posixshmem.shm_open("/" + shm_name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                _posixshmem.shm_unlink("/" + shm_name)
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise TransportUnavailableError(
                        f"/dev/shm has no room for a {size >> 20} MiB block: {exc}. Free space there, "
                        "or lower HOTWEIGHTS_BUCKET_MB") from None
                raise
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            # Older kernels: touch one byte per page so later copies don't pay first-touch faults.
            view = memoryview(self.mm)
            for off in range(0, size, mmap.PAGESIZE):
                view[off] = 0
            view.release()
        self.mem = memoryview(self.mm)

    def destroy(self) -> None:
        try:
            _posixshmem.shm_unlink("/" + self.shm_name)
        except FileNotFoundError:
            pass  # already unlinked by a cleanup
        self.mem.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes when it does


class ShmPublisher(ServedPublisher):
    name: ClassVar[str] = "shm"
    zero_copy: ClassVar[bool] = True
    multi_receiver: ClassVar[bool] = True
    cross_host: ClassVar[bool] = False
    addressable: ClassVar[bool] = True
    late_join: ClassVar[bool] = True
    pipelined: ClassVar[bool] = False
    limits: ClassVar[dict[str, str]] = {
        "cross_host": "shared memory exists on one host only",
        "pipelined": "buckets are written straight into shared memory and verified there in place; a version "
                     "stays mapped until commit, so there is nothing in flight to window or cap",
    }

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _require_posix()
        if endpoint.scheme != "shm":
            raise EndpointError(f"the shm transport needs an shm://NAME endpoint, got {endpoint}")
        super().__init__(endpoint, config)
        self._seq = 0
        self._free: list[_Block] = []
        self._all: dict[str, _Block] = {}
        self._lock = threading.Condition()
        self._server: Optional[ControlServer] = None
        self._stats = TransportStats()
        self._in_use_bytes = 0

    def start(self, handler: PublisherHandler) -> None:
        reclaim_dead_blocks(self.endpoint.name)  # a dead predecessor's (the factory sweeps every name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = control_address(self.endpoint.name)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise EndpointError(
                    f"another publisher already serves {self.endpoint}; use another name or close it") from None
            raise
        sock.listen(128)
        self._server = ControlServer(sock, transport=self, events=handler, timeout_s=self.config.timeout_s,
                                     max_message_bytes=self.config.max_message_bytes,
                                     name=self.endpoint.name)
        self._server.start()

    def alloc(self, nbytes: int) -> BucketBuffer:
        with self._lock:
            fits = [b for b in self._free if b.size >= nbytes]
            if fits:
                block = min(fits, key=lambda b: b.size)
                self._free.remove(block)
            else:
                # Full-size blocks are interchangeable; small ones (a version's last bucket, a
                # small model) stay small so a tiny model does not pre-fault whole buckets.
                full = self.config.bucket_bytes + (1 << 20)
                size = full if full >= nbytes >= self.config.bucket_bytes // 2 else nbytes
                size = -(-size // _BLOCK_ALIGN) * _BLOCK_ALIGN
                self._seq += 1
                shm_name = block_name(self.endpoint.name, self._seq)
                block = _Block(shm_name, size)
                self._all[shm_name] = block
                log.debug("created shm block %s (%d MiB)", shm_name, size >> 20)
            self._in_use_bytes += block.size
            self._stats.inflight_buckets = len(self._all) - len(self._free)
            self._stats.inflight_bytes = self._in_use_bytes
            self._stats.inflight_buckets_high = max(self._stats.inflight_buckets_high,
                                                    self._stats.inflight_buckets)
            self._stats.inflight_bytes_high = max(self._stats.inflight_bytes_high, self._in_use_bytes)
        return BucketBuffer(mem=block.mem, handle=block.shm_name, capacity=block.size, owner=block)

    def post(self, to: Sequence[str], version: int, index: int, buf: BucketBuffer) -> None:
        t0 = time.perf_counter()
        msg = {"op": "bucket", "version": version, "index": index, "handle": buf.handle, "offset": 0,
               "length": buf.length}
        if self.config.handle_token is not None:
            msg["sig"] = sign_handle(self.config.handle_token, *_handle_parts(self.endpoint, msg))
        self.send(to, msg)
        self._stats.bytes_posted += buf.length
        self._stats.buckets_posted += 1
        self._stats.seconds_posting += time.perf_counter() - t0

    def recycle(self, buf: BucketBuffer) -> None:
        block = buf.owner
        with self._lock:
            if block.shm_name in self._all and block not in self._free:
                self._free.append(block)
                self._in_use_bytes -= block.size
                self._stats.inflight_buckets = len(self._all) - len(self._free)
                self._stats.inflight_bytes = self._in_use_bytes
                self._lock.notify_all()

    def discard(self, buf: BucketBuffer) -> None:
        """The handle of ``buf`` expired: unlink the block for good instead of reusing it (a receiver
        that never released it keeps its own mapping; nobody can open the name any more)."""
        block = buf.owner
        with self._lock:
            if self._all.pop(block.shm_name, None) is None:
                return
            if block in self._free:
                self._free.remove(block)
            else:
                self._in_use_bytes -= block.size
            self._stats.inflight_buckets = len(self._all) - len(self._free)
            self._stats.inflight_bytes = self._in_use_bytes
            block.destroy()
            self._lock.notify_all()
        log.info("unlinked expired shm block %s", block.shm_name)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            for block in self._all.values():
                block.destroy()
            self._all.clear()
            self._free.clear()

    def stats(self) -> TransportStats:
        return self._stats


class ShmReceiver(ClientReceiver):
    name: ClassVar[str] = "shm"

    def __init__(self, endpoint: Endpoint, config: SyncConfig):
        _require_posix()
        if endpoint.scheme != "shm":
            raise EndpointError(f"the shm transport needs an shm://NAME endpoint, got {endpoint}")
        super().__init__(endpoint, config)
        self._maps: dict[str, memoryview] = {}
        self._client: Optional[ControlClient] = None
        self._handler: Optional[ReceiverHandler] = None
        self._publisher_pid: Optional[int] = None

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
                self._cleanup_if_publisher_dead()
                raise
            return s

        self._client = ControlClient(
            connect, hello=hello, on_connected=lambda: handler.on_connected({}),
            on_frame=self._on_frame, on_lost=self._on_lost, on_error=handler.on_error,
            timeout_s=self.config.timeout_s,
            max_message_bytes=self.config.max_message_bytes, name=self.endpoint.name)
        self._client.start()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._maps.clear()

    # ---------------------------------------------------------------- frames from the publisher
    def _on_frame(self, msg: dict[str, Any]) -> None:
        assert self._handler is not None
        op = msg["op"]
        if op == "welcome":
            self._publisher_pid = msg["pid"]
        if op == "bucket":
            try:
                key = self.config.handle_token
                parts = _handle_parts(self.endpoint, msg)
                if key is not None and not verify_handle(key, msg.get("sig"), *parts):
                    raise WireFormatError(f"bucket handle {msg['handle']!r} has no valid HMAC signature "
                                          "(HOTWEIGHTS_HANDLE_TOKEN differs from the publisher's?)")
                data = self._view(msg["handle"], msg["offset"], msg["length"])
            except (WireFormatError, OSError) as exc:
                self._handler.on_bucket_failed(msg["version"], msg["index"], exc)
                return
            self._handler.on_bucket(msg["version"], msg["index"], data)
            return
        if op == "drop":
            for handle in msg["handles"]:
                if isinstance(handle, str):
                    self._maps.pop(handle, None)
            return
        self._handler.on_message(msg)

    def _on_lost(self, reason: str) -> None:
        # Drop our references; views the engine still holds keep their mapping alive until released.
        self._maps.clear()
        self._cleanup_if_publisher_dead()
        if self._handler is not None:
            self._handler.on_lost(reason)

    def _cleanup_if_publisher_dead(self) -> None:
        pid = self._publisher_pid
        if pid is not None and not pid_alive(pid):
            reclaim_dead_blocks(self.endpoint.name)
            self._publisher_pid = None

    def _view(self, handle: str, offset: int, length: int) -> memoryview:
        parsed = parse_block_name(handle)
        if parsed is None or parsed.endpoint != self.endpoint.name:
            raise WireFormatError(f"bucket handle {handle!r} does not belong to {self.endpoint}")
        mem = self._maps.get(handle)
        if mem is None:
            fd = _posixshmem.shm_open("/" + handle, os.O_RDONLY, 0)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            mem = memoryview(mm)
            self._maps[handle] = mem
        if offset + length > len(mem):
            raise WireFormatError(f"bucket range {offset}+{length} exceeds block {handle} ({len(mem)} bytes)")
        return mem[offset:offset + length]
