"""Pieces the copying transports share: ordered delivery, receive buffer pool, bucket geometry."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from hotweights_trainer import WireFormatError
from hotweights_trainer.transports import tcp
from hotweights_trainer.transports.buffers import HostBufferPool, ReceivePool, size_class
from hotweights_trainer.transports.delivery import EventPending, OrderedDelivery

MB = 1 << 20


class Recorder:
    def __init__(self):
        self.calls = []
        self.done = threading.Event()

    def on_connected(self, info):
        self.calls.append(("connected",))

    def on_message(self, msg):
        self.calls.append(("msg", msg["op"]))
        if msg["op"] == "last":
            self.done.set()

    def on_bucket(self, version, index, data):
        self.calls.append(("bucket", version, index, bytes(data)))

    def on_bucket_failed(self, version, index, error):
        self.calls.append(("failed", version, index, type(error).__name__))

    def on_lost(self, reason):
        self.calls.append(("lost", reason))


def test_delivery_keeps_publisher_order_while_bytes_arrive_late():
    rec = Recorder()
    d = OrderedDelivery(rec, timeout_s=5, name="t")
    slow, fast = EventPending(2), EventPending(1)
    d.frame({"op": "begin"})
    d.bucket(1, 0, memoryview(b"a"), slow)
    d.bucket(1, 1, memoryview(b"b"), fast)
    d.frame({"op": "last"})
    fast.finish()  # the second bucket completes first ...
    time.sleep(0.1)
    assert rec.calls == [("msg", "begin")]  # ... but nothing overtakes the first
    slow.finish()
    slow.finish()
    assert rec.done.wait(5)
    assert rec.calls == [("msg", "begin"), ("bucket", 1, 0, b"a"), ("bucket", 1, 1, b"b"), ("msg", "last")]
    d.close()


def test_abandoned_and_failed_buckets_do_not_block_what_follows():
    rec = Recorder()
    d = OrderedDelivery(rec, timeout_s=30, name="t")
    never, broken = EventPending(1), EventPending(1)
    forgotten = []
    d.bucket(3, 0, memoryview(b"x"), never, on_abandon=lambda: forgotten.append(3))
    d.bucket(4, 0, memoryview(b"y"), broken)
    d.frame({"op": "last"})
    broken.finish(ConnectionError("peer reset"))
    t0 = time.monotonic()
    assert d.abandon(3) == 1
    assert rec.done.wait(5) and time.monotonic() - t0 < 5
    assert rec.calls == [("failed", 4, 0, "ConnectionError"), ("msg", "last")] and forgotten == [3]
    d.close()


def test_a_bucket_that_never_arrives_fails_at_the_deadline():
    rec = Recorder()
    d = OrderedDelivery(rec, timeout_s=0.3, name="t")
    d.bucket(5, 2, memoryview(b""), EventPending(1))
    d.frame({"op": "last"})
    assert rec.done.wait(5)
    assert rec.calls == [("failed", 5, 2, "SyncTimeoutError"), ("msg", "last")]
    d.close()


def test_receive_pool_reuses_only_released_idle_buffers():
    pool = ReceivePool(4 * MB)
    a = pool.lend(1, 4 * MB)
    busy = [True]
    a.busy = lambda: busy[0]
    pool.release(1)
    b = pool.lend(2, 4 * MB)
    assert b is not a  # a transfer may still write into a
    busy[0] = False
    c = pool.lend(3, 4 * MB)
    assert c is a and pool.created == 2
    pool.forget(c)
    pool.release(3)
    assert pool.lend(4, 4 * MB) is not c


def test_an_abandoned_receive_buffer_stays_mapped_until_its_transfer_stops():
    """A transport library may still write into a buffer whose bucket was abandoned (a posted UCX
    receive is matched by whatever the peer sends later): unmapping it then crashes the process."""
    pool = ReceivePool(4 * MB, keep_versions=1)
    busy = [True, True]
    a = pool.lend(1, 4 * MB)
    a.busy = lambda: busy[0]
    b = pool.lend(2, 4 * MB)  # version 1 was never released and falls out of the pool here
    b.busy = lambda: busy[1]
    gone_a, gone_b = weakref.ref(a), weakref.ref(b)
    pool.forget(b)
    del a, b
    gc.collect()
    assert gone_a() is not None and gone_b() is not None and pool.held == 2
    busy[0] = busy[1] = False
    assert pool.held == 0
    gc.collect()
    assert gone_a() is None and gone_b() is None  # idle again: now the memory goes


def test_host_buffers_are_prefaulted_writable_and_size_classed():
    pool = HostBufferPool(32 * MB)
    buf = pool.get(20 * MB)
    assert buf.size == size_class(20 * MB, 32 * MB) >= 33 * MB  # full buckets share one class
    buf.mem[:4] = b"abcd"
    assert bytes(buf.mem[:4]) == b"abcd"
    small = pool.get(100)
    assert small.size == 2 * MB
    pool.put(buf)
    assert pool.get(30 * MB) is buf


def test_bucket_geometry_is_validated():
    assert tcp.bucket_geometry({"op": "bucket", "length": 10, "chunk": 4}) == (10, 4)
    assert tcp.chunks(10, 4) == [(0, 4), (4, 4), (8, 2)]
    for bad in ({"length": 0, "chunk": 4}, {"length": 10, "chunk": 0}, {"length": "10", "chunk": 4},
                {"length": 1 << 30, "chunk": 1}, {"length": True, "chunk": 4}):
        with pytest.raises(WireFormatError):
            tcp.bucket_geometry({"op": "bucket", **bad})
