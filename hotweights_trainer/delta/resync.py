"""Publisher side of resync: dense copies of ranges for a receiver whose base did not match.

A receiver sends ``{"op": "resync", "version": v, "ranges": [[name, start, count], ...]}`` when it
cannot rebuild some delta entries of version v: it missed a version, joined late (catch-up of a
delta version), or a patched range failed its checksum. A worker thread (so neither the training
thread nor the transport's thread waits on it) packs the bytes those ranges have in version v from
the encoder's snapshots into buckets flagged ``FLAG_RESYNC`` and posts them to that receiver only.
The receiver checks each range against the delta entry's ``tensor_xxh3`` and only then stages.

The buffers stay with the receiver until it reports on that version (staged, nack, release) or
leaves. A request for a version whose bytes are no longer held (it was superseded twice) is dropped
with a log line; that receiver misses the staging deadline and catches up on the next version.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Optional

from .. import metrics
from ..errors import HotweightsError, WireFormatError
from ..transports.base import BucketBuffer, PublisherTransport
from ..wire.bucket import FLAG_RESYNC, Entry
from ..wire.packer import pack_into
from .encoder import DeltaEncoder, RangeKey, plan_dense

log = logging.getLogger(__name__)


def parse_ranges(raw: Any, limit: int) -> list[RangeKey]:
    """Validate the ``ranges`` field of a resync request (untrusted JSON)."""
    if not isinstance(raw, list) or len(raw) > limit:
        raise WireFormatError(f"resync request: ranges must be a list of at most {limit} items")
    keys: list[RangeKey] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item[1:])):
            raise WireFormatError(f"resync request: bad range {str(item)[:200]}")
        keys.append((item[0], item[1], item[2]))
    return keys


class ResyncServer:
    def __init__(self, encoder: DeltaEncoder, transport: PublisherTransport, *, session: int,
                 bucket_bytes: int, endpoint_label: str, max_ranges: Callable[[], int]):
        self._encoder = encoder
        self._tx = transport
        self._session = session
        self._bucket_bytes = bucket_bytes
        self._ep = endpoint_label
        self._max_ranges = max_ranges
        self._queue: queue.Queue = queue.Queue()
        self._held: dict[str, list[tuple[int, BucketBuffer]]] = {}
        self._held_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hotweights-resync", daemon=True)
        self._thread.start()
        self.served_ranges = 0

    # ---------------------------------------------------------------- called from the transport thread
    def request(self, rid: str, version: int, raw_ranges: Any) -> None:
        try:
            keys = parse_ranges(raw_ranges, max(self._max_ranges(), 1))
        except WireFormatError as exc:
            log.warning("receiver %s: %s", rid, exc)
            return
        self._queue.put((rid, version, keys))

    def release(self, rid: str, version: int) -> None:
        """``rid`` is done with ``version`` (and anything older): its resync buffers can be reused."""
        with self._held_lock:
            held = self._held.get(rid, [])
            done = [buf for v, buf in held if v <= version]
            self._held[rid] = [(v, buf) for v, buf in held if v > version]
        for buf in done:
            self._tx.recycle(buf)

    def forget(self, rid: str) -> None:
        with self._held_lock:
            done = self._held.pop(rid, [])
        for _, buf in done:
            self._tx.recycle(buf)

    def close(self, timeout: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            rid, version, keys = item
            try:
                self._serve(rid, version, keys)
            except HotweightsError as exc:
                # The receiver then misses its staging deadline and is disconnected; it catches
                # up later. Nothing to raise into: this thread serves every receiver.
                log.warning("could not resync %d range(s) of version %d for %s: %s", len(keys), version,
                            rid, exc)

    def _serve(self, rid: str, version: int, keys: list[RangeKey]) -> None:
        entries: list[tuple[Entry, Optional[Any]]] = []
        for key in keys:
            meta = self._encoder.describe(key)
            if meta is None:
                log.warning("receiver %s asked to resync unknown range %s of version %d", rid, key, version)
                return
            dtype, shape = meta
            entries.append((Entry(key[0], dtype, shape, key[1], key[2]), None))
        plans = list(plan_dense(entries, self._bucket_bytes))
        bufs = [self._tx.alloc(plan.total_len) for plan in plans]  # may wait: never under the lock
        posted = False
        try:
            with self._encoder.locked():
                for plan in plans:
                    for i, e in enumerate(plan.entries):
                        snap = self._encoder.snapshot((e.name, e.elem_start, e.elem_count), version)
                        if snap is None:
                            log.info("resync for %s: version %d of %s is no longer held; dropped", rid,
                                     version, e.name)
                            return
                        plan.sources[i] = snap
                for index, (plan, buf) in enumerate(zip(plans, bufs)):
                    buf.length = pack_into(buf.mem, plan, version=version, index=index, session=self._session,
                                           flags=FLAG_RESYNC)
            with self._held_lock:
                self._held.setdefault(rid, []).extend((version, buf) for buf in bufs)
            posted = True
            for index, buf in enumerate(bufs):
                self._tx.post([rid], version, index, buf)
        finally:
            if not posted:
                for buf in bufs:
                    self._tx.recycle(buf)
        self.served_ranges += len(keys)
        metrics.RESYNCS.labels(self._ep, "publisher").inc(len(keys))
        log.info("resynced %d range(s) of version %d to %s (%d bucket(s))", len(keys), version, rid, len(bufs))
