"""One upstream version passing through a host relay: buckets in as they are verified, the same buckets out.

A relay (:mod:`.node`) stages each upstream version with a ``WeightReceiver`` and republishes it
with one ``WeightPublisher`` per downstream endpoint (the host's ``shm://`` receivers, and
optionally a ``tcp://`` endpoint the next host's relay follows). For each upstream version it
creates one :class:`RelayedVersion`; each downstream publisher's ``publish()`` consumes it through
its own :class:`ForwardedVersion`:

1. ``begin`` upstream -> every downstream publisher begins the same version number
   (``min_version``), so a version is called the same on every host. A downstream fleet that
   already numbered past it (its receivers run it or newer, as after the relay restarted) is sent
   nothing and counts as staged; a version upstream already ended begins nowhere;
2. each upstream bucket that passed every check is copied into a downstream buffer and posted at
   once (the header gets the downstream session; the payload checksum travels unchanged), so the
   next hop starts while the rest of the version is still arriving;
3. ``end`` upstream -> each downstream publisher sends ``end`` and waits for its receivers;
4. when *every* downstream fleet has staged, the relay answers ``staged`` upstream -- never before;
   a downstream rejection or missed deadline becomes a ``nack`` (:class:`~..errors.RelayError`);
5. upstream ``commit`` -> every downstream publisher commits; upstream ``abort``, a newer ``begin``
   or a lost upstream -> every downstream publisher aborts.

So the all-or-nothing commit spans every receiver behind every relay. Waits are bounded by
``timeout_s``. Versions through a relay are dense: the relay asks its upstream for dense versions
and its publishers run with ``delta='off'``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

import xxhash

from ..errors import HotweightsError, RelayError, SyncTimeoutError, VersionAbortedError
from ..wire.bucket import BucketHeader, restamp

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 256 << 10
"""Largest relay report (hello or heartbeat ``relay`` field) a publisher keeps; a bound, not a knob."""


def relay_info(msg: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``relay`` field of a hello or heartbeat, validated; None when absent or malformed.

    A relay reports its host, its downstream endpoints and the fleets behind it, for
    ``hotweights status``; the engine never acts on the content, so a bad report is just ignored.
    """
    info = msg.get("relay")
    if not isinstance(info, dict) or not isinstance(info.get("host"), str):
        return None
    if len(json.dumps(info)) > MAX_REPORT_BYTES:
        log.warning("relay report from host %s exceeds %d bytes; ignored", info["host"][:64],
                    MAX_REPORT_BYTES)
        return None
    return info


class ForwardedBucket:
    """One verified upstream bucket, written into a downstream buffer by the publisher's packing loop."""

    def __init__(self, header: BucketHeader, data: memoryview):
        self.header = header
        self.data = data

    @property
    def total_len(self) -> int:
        return self.header.total_len

    @property
    def entries(self) -> list[Any]:
        return list(self.header.entries)

    def write_into(self, mem: memoryview, *, version: int, index: int, session: int) -> int:
        n = self.header.total_len
        if index != self.header.index:
            raise RelayError(f"relay forwarding bucket {self.header.index} as index {index}: out of order")
        mem[:n] = self.data[:n]  # one memcpy; the payload checksum stays valid
        restamp(mem, version=version, session=session)
        return n


class RelayedVersion:
    """One upstream version fanned out to ``n_down`` downstream publishers (thread-safe).

    ``confirm(version) -> bool`` sends ``staged`` upstream (False: the version is gone upstream);
    ``reject(version, error)`` sends ``nack`` upstream.
    """

    def __init__(self, version: int, session: int, step: Optional[int], n_down: int, timeout_s: float,
                 confirm: Callable[[int], bool], reject: Callable[[int, HotweightsError], None]):
        self.version = version
        self.session = session
        self.step = step
        self.timeout_s = timeout_s
        self._n_down = n_down
        self._confirm = confirm
        self._reject = reject
        self._cond = threading.Condition()
        self._buckets: list[ForwardedBucket] = []
        self._n_buckets: Optional[int] = None
        self._staged: set[int] = set()
        self._confirmed = False
        self.decision: Optional[bool] = None  # True: committed upstream; False: aborted
        self.reason = ""
        self.t_begin = time.monotonic()
        self.held = False  # collected but not passed on until its end (relay/node.py, on_begin)

    def fingerprint(self) -> str:
        """The content of the version: entries and payload checksum of every bucket (not the header
        checksum, which covers the version and session)."""
        h = xxhash.xxh3_64()
        with self._cond:
            for b in self._buckets:
                hd = b.header
                h.update(f"{hd.index}:{hd.payload_len}:{hd.payload_xxh3};".encode())
                for e in hd.entries:
                    h.update(f"{e.name}:{e.elem_start}:{e.elem_count}:{e.encoding};".encode())
        return h.hexdigest()

    # -- upstream side (receiver callbacks: record only, never block)
    def add(self, bucket: ForwardedBucket) -> None:
        with self._cond:
            self._buckets.append(bucket)
            self._cond.notify_all()

    def end(self, n_buckets: int) -> None:
        with self._cond:
            self._n_buckets = n_buckets
            self._cond.notify_all()

    def decide(self, committed: bool, reason: str) -> None:
        with self._cond:
            if self.decision is None:
                self.decision = committed
                self.reason = reason
                self._cond.notify_all()

    # -- downstream side (publisher threads)
    def feed(self, i: int) -> "ForwardedVersion":
        return ForwardedVersion(self, i)

    def _next_bucket(self, k: int) -> Optional[ForwardedBucket]:
        """Bucket ``k`` once it arrived; None after the last one; raises when the version died upstream."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while True:
                if self.decision is False:
                    raise VersionAbortedError(self.version, f"upstream: {self.reason}")
                if k < len(self._buckets):
                    return self._buckets[k]
                if self._n_buckets is not None and k >= self._n_buckets:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(f"relay: bucket {k} of version {self.version} did not arrive from "
                                           f"upstream within {self.timeout_s:.1f}s")
                self._cond.wait(left)

    def _downstream_staged(self, i: int) -> None:
        """Downstream fleet ``i`` staged; the last one to do so answers ``staged`` upstream."""
        with self._cond:
            self._staged.add(i)
            last = len(self._staged) == self._n_down and not self._confirmed and self.decision is None
            if last:
                self._confirmed = True
        if last and not self._confirm(self.version):  # outside our lock: it takes the receiver's
            self.decide(False, "no longer staging upstream (aborted, superseded or publisher lost)")

    def already_there(self, i: int) -> None:
        """Downstream fleet ``i`` already runs this version or a newer one: staged, with nothing sent."""
        self._downstream_staged(i)

    def _wait_upstream(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self.decision is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(f"relay: upstream did not decide version {self.version} within "
                                           f"{self.timeout_s:.1f}s of this host staging it")
                self._cond.wait(left)
            if not self.decision:
                raise VersionAbortedError(self.version, f"upstream: {self.reason}")

    def failed(self, endpoint: str, exc: BaseException) -> None:
        """A downstream publish failed: unless upstream already decided, reject the version upstream."""
        with self._cond:
            first = self.decision is None
        if not first:
            return
        err = RelayError(f"relay could not pass version {self.version} to {endpoint}: "
                         f"{type(exc).__name__}: {exc}")
        self._reject(self.version, err)
        self.decide(False, str(err))


class ForwardedVersion:
    """What one downstream ``WeightPublisher.publish`` consumes (the publisher checks for this type)."""

    def __init__(self, relayed: RelayedVersion, i: int):
        self._rv = relayed
        self._i = i
        self.version = relayed.version

    def ensure_undecided(self) -> None:
        """Raise when upstream already ended this version: the publisher must not begin it.

        Called under the downstream publisher's publish lock, so a superseded version's thread that
        got the lock after the newer version's thread never begins (and burns) a version number.
        """
        rv = self._rv
        with rv._cond:
            if rv.decision is not None:
                state = "committed" if rv.decision else "ended"
                raise VersionAbortedError(rv.version, f"upstream already {state} it before it could be "
                                          f"passed on: {rv.reason}")

    def buckets(self) -> Iterator[ForwardedBucket]:
        k = 0
        while True:
            b = self._rv._next_bucket(k)
            if b is None:
                return
            yield b
            k += 1

    def before_commit(self, version: int) -> None:
        """Called by the publisher once its receivers all staged: blocks until upstream decides."""
        self._rv._downstream_staged(self._i)
        self._rv._wait_upstream()


__all__ = ["ForwardedBucket", "ForwardedVersion", "RelayedVersion", "relay_info", "MAX_REPORT_BYTES"]
