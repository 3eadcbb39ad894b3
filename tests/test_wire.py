"""Bucket format: round trip, and untrusted bytes never crash the decoder."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotweights_trainer.errors import CorruptBucketError, WireFormatError
from hotweights_trainer.wire import messages
from hotweights_trainer.wire.bucket import decode_bucket, decode_header
from hotweights_trainer.wire.packer import pack_into, plan_buckets


def _pack(tensors: dict, bucket_bytes: int = 1 << 16):
    out = []
    for i, plan in enumerate(plan_buckets(tensors.items(), bucket_bytes)):
        buf = bytearray(plan.total_len)
        n = pack_into(memoryview(buf), plan, version=7, index=i, session=99)
        out.append(bytes(buf[:n]))
    return out


def test_round_trip_and_split():
    tensors = {"a": torch.arange(100_000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16),
               "s": torch.tensor(2.5), "e": torch.empty(0, 3)}
    buckets = _pack(tensors)
    assert len(buckets) > 5  # "a" (400 kB) is split over 64 kB buckets
    seen = {}
    for raw in buckets:
        h = decode_bucket(memoryview(raw))
        assert h.version == 7 and h.session == 99
        for e in h.entries:
            flat = torch.frombuffer(bytearray(raw[h.header_len + e.payload_off:][:e.payload_nbytes]) or bytearray(1),
                                    dtype=torch.uint8)[:e.payload_nbytes].view(e.dtype)
            seen.setdefault(e.name, []).append((e.elem_start, flat))
    a = torch.cat([t for _, t in sorted(seen["a"], key=lambda x: x[0])])
    assert torch.equal(a, tensors["a"])
    assert torch.equal(seen["b"][0][1], tensors["b"])


def test_packed_bytes_do_not_depend_on_the_buffer_or_the_copy_path():
    """Fused copy+hash packing: the checksum covers exactly the bytes in the bucket (padding zeroed even
    in a reused, dirty buffer), whichever path wrote each entry (memmove, a cast, a strided gather)."""
    big = torch.randn(300_000)  # larger than a few copy chunks, split over buckets
    tensors = {"big": big, "odd": torch.arange(37, dtype=torch.int16), "t": torch.randn(64, 48).t(),
               "h": torch.randn(1000, dtype=torch.float16)}
    for send_dtype in (None, torch.bfloat16):
        plans = list(plan_buckets(tensors.items(), 1 << 19, send_dtype))
        for i, plan in enumerate(plans):
            clean, dirty = bytearray(plan.total_len), bytearray(b"\xa5" * (plan.total_len + 4096))
            n = pack_into(memoryview(clean), plan, version=3, index=i, session=1)
            m = pack_into(memoryview(dirty), plan, version=3, index=i, session=1)
            assert n == m == plan.total_len and bytes(clean) == bytes(dirty[:n])
            h = decode_bucket(memoryview(clean))  # payload checksum matches the bytes written
            for e in h.entries:
                got = torch.frombuffer(clean, dtype=torch.uint8, count=e.payload_nbytes,
                                       offset=h.header_len + e.payload_off).view(e.dtype)
                want = tensors[e.name].reshape(-1)[e.elem_start:e.elem_start + e.elem_count]
                assert torch.equal(got, want.to(e.dtype))


def test_payload_corruption_detected():
    raw = bytearray(_pack({"w": torch.randn(1000)})[0])
    raw[-10] ^= 1
    with pytest.raises(CorruptBucketError, match="payload checksum"):
        decode_bucket(memoryview(raw))


def test_header_corruption_detected():
    raw = bytearray(_pack({"w": torch.randn(1000)})[0])
    raw[70] ^= 1
    with pytest.raises(CorruptBucketError, match="header checksum"):
        decode_header(memoryview(raw))


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 128, -1])
def test_truncated_bucket(cut):
    raw = _pack({"w": torch.randn(100)})[0]
    with pytest.raises(WireFormatError, match="truncated|bad header"):
        decode_bucket(memoryview(raw[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 599), st.integers(0, 255))
def test_garbage_never_crashes(data, pos, val):
    good = bytearray(_pack({"x": torch.arange(8.0), "y": torch.ones(2, 2)})[0])
    if data:
        good[pos % len(good)] = val
        candidates = [bytes(good), data, bytes(good[:pos % len(good)]) + data]
    else:
        candidates = [bytes(good)]
    for raw in candidates:
        try:
            decode_bucket(memoryview(raw))
        except WireFormatError:
            pass  # the only acceptable failure


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_control_message_garbage_is_rejected_cleanly(body):
    reader = messages.FrameReader(1 << 10)
    try:
        reader.feed(struct.pack("<I", len(body)) + body)
    except WireFormatError:
        pass


def test_control_message_limits_and_schema():
    reader = messages.FrameReader(100)
    with pytest.raises(WireFormatError, match="exceeds"):
        reader.feed(struct.pack("<I", 1000))
    with pytest.raises(WireFormatError, match="field 'version'"):
        messages.validate({"op": "commit", "version": "7"})
    with pytest.raises(WireFormatError, match="unknown"):
        messages.validate({"op": "exec"})
    assert messages.validate({"op": "commit", "version": 3})["version"] == 3
