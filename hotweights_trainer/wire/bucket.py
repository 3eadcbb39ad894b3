"""Bucket layout: one self-describing, checksummed blob of packed tensor bytes.

A bucket is ``[header][payload]``. Every integer is little-endian.

Header prefix, 64 bytes::

    magic        4s   b"HWB1"
    fmt          u16  format version (1)
    flags        u16  bit 0 (FLAG_RESYNC): dense copies of ranges a receiver asked for (delta resync),
                      not part of the version's bucket count; bit 1 (FLAG_DEVICE): the payload lives
                      in device memory and ``payload_xxh3`` holds its device digest
                      (hotweights_trainer/gpu/checksum.py) instead of xxh3; other bits 0
    header_len   u32  bytes of the whole header, a multiple of 64; the payload starts here
    n_entries    u32  entries in the table below
    version      u64  weight version this bucket belongs to
    index        u32  position of this bucket within its version
    reserved     u32  0
    payload_len  u64  bytes of payload
    payload_xxh3 u64  xxh3-64 of the payload bytes
    session      u64  random id of the publisher instance
    header_xxh3  u64  xxh3-64 of header bytes [0:56] + [64:header_len]

Entry table, ``n_entries`` x 64 bytes, then a blob with the names (UTF-8) and shapes (u64 each)::

    name_off u32, name_len u32, dims_off u32, ndim u32      offsets from the header start
    dtype u8, encoding u8, flags u16, reserved u32          dtype code (wire/dtypes.py), 0 = dense,
                                                            1 = sparse delta (wire/delta.py)
    payload_off u64, payload_nbytes u64                     relative to the payload start, 64-aligned
    elem_start u64, elem_count u64                          the slice of the flattened tensor carried
    tensor_xxh3 u64                                         xxh3-64 of the entry's elements after
                                                            decoding (0 = not sent; delta entries
                                                            always send it)

A tensor larger than a bucket is split into several entries (in several buckets) with increasing
``elem_start``. Nothing in here is pickled, and :func:`decode_header` checks every offset and length
against the bytes actually present before it trusts them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Sequence

import torch
import xxhash

from ..errors import CorruptBucketError, WireFormatError
from .dtypes import code_dtype, dtype_code, itemsize

MAGIC = b"HWB1"
FORMAT_VERSION = 1
ALIGN = 64
MAX_NDIM = 16

ENC_DENSE = 0
ENC_DELTA = 1
KNOWN_ENCODINGS = {ENC_DENSE, ENC_DELTA}
"""Entry encodings a receiver understands; other codecs register theirs here."""

FLAG_RESYNC = 1
FLAG_DEVICE = 2
KNOWN_FLAGS = FLAG_RESYNC | FLAG_DEVICE

_PREFIX = struct.Struct("<4sHHIIQIIQQQQ")
_ENTRY = struct.Struct("<IIIIBBHIQQQQQ")
assert _PREFIX.size == 64 and _ENTRY.size == 64


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor (or one slice of a large tensor) inside a bucket."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    elem_start: int
    elem_count: int
    payload_off: int = 0
    payload_nbytes: int = 0
    encoding: int = ENC_DENSE
    tensor_xxh3: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_whole(self) -> bool:
        return self.elem_start == 0 and self.elem_count == self.numel


@dataclass(frozen=True, slots=True)
class BucketHeader:
    version: int
    index: int
    session: int
    header_len: int
    payload_len: int
    payload_xxh3: int
    entries: tuple[Entry, ...]
    flags: int = 0

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len


def header_size(entries: Sequence[Entry]) -> int:
    """Bytes the header for these entries takes (already aligned)."""
    blob = 0
    for e in entries:
        blob += len(e.name.encode("utf-8"))
        blob = align(blob, 8) + 8 * len(e.shape)
    return align(_PREFIX.size + _ENTRY.size * len(entries) + blob)


def layout_payload(entries: Sequence[Entry]) -> tuple[list[Entry], int]:
    """Assign 64-aligned payload offsets to dense entries; returns the entries and the payload length."""
    out: list[Entry] = []
    off = 0
    for e in entries:
        nbytes = e.elem_count * itemsize(e.dtype) if e.encoding == ENC_DENSE else e.payload_nbytes
        out.append(Entry(e.name, e.dtype, e.shape, e.elem_start, e.elem_count, off, nbytes,
                         e.encoding, e.tensor_xxh3))
        off = align(off + nbytes)
    return out, off


def write_header(buf: memoryview, *, version: int, index: int, session: int,
                 entries: Sequence[Entry], payload_len: int, flags: int = 0, payload_inline: bool = True) -> int:
    """Write the header (without its checksums) at the start of ``buf``; returns its length.

    Call :func:`seal` once the payload is in place. ``payload_inline=False``: the payload lives
    elsewhere (device memory), ``buf`` only needs room for the header; seal with :func:`seal_header`.
    """
    hlen = header_size(entries)
    if len(buf) < hlen + (payload_len if payload_inline else 0):
        raise WireFormatError(f"bucket buffer of {len(buf)} bytes cannot hold {hlen + payload_len}")
    buf[:hlen] = bytes(hlen)  # deterministic header bytes even in a reused buffer
    cursor = _PREFIX.size + _ENTRY.size * len(entries)
    for i, e in enumerate(entries):
        name = e.name.encode("utf-8")
        name_off = cursor
        buf[cursor:cursor + len(name)] = name
        cursor = align(cursor + len(name), 8)
        dims_off = cursor
        if e.shape:
            struct.pack_into(f"<{len(e.shape)}Q", buf, cursor, *e.shape)
        cursor += 8 * len(e.shape)
        _ENTRY.pack_into(buf, _PREFIX.size + _ENTRY.size * i, name_off, len(name), dims_off,
                         len(e.shape), dtype_code(e.dtype), e.encoding, 0, 0, e.payload_off,
                         e.payload_nbytes, e.elem_start, e.elem_count, e.tensor_xxh3)
    _PREFIX.pack_into(buf, 0, MAGIC, FORMAT_VERSION, flags, hlen, len(entries), version, index, 0,
                      payload_len, 0, session, 0)
    return hlen


def seal(buf: memoryview) -> None:
    """Compute and store the payload and header checksums of a bucket written in ``buf``."""
    (_, _, _, hlen, n, version, index, _, plen, _, session, _) = _PREFIX.unpack_from(buf, 0)
    pxx = xxhash.xxh3_64_intdigest(buf[hlen:hlen + plen])
    struct.pack_into("<Q", buf, 40, pxx)
    struct.pack_into("<Q", buf, 56, _header_digest(buf, hlen))


def seal_header(buf: memoryview, payload_digest: int) -> None:
    """Store ``payload_digest`` (computed wherever the payload lives) and the header checksum."""
    (_, _, _, hlen, *_rest) = _PREFIX.unpack_from(buf, 0)
    struct.pack_into("<Q", buf, 40, payload_digest & 0xFFFFFFFFFFFFFFFF)
    struct.pack_into("<Q", buf, 56, _header_digest(buf, hlen))


def restamp(buf: memoryview, *, version: int, session: int) -> None:
    """Give a verified bucket another version and session (a host relay republishing it to its own
    receivers); the payload and its checksum are untouched, the header checksum is recomputed."""
    (_, _, _, hlen, *_rest) = _PREFIX.unpack_from(buf, 0)
    struct.pack_into("<Q", buf, 16, version)
    struct.pack_into("<Q", buf, 48, session)
    struct.pack_into("<Q", buf, 56, _header_digest(buf, hlen))


def _header_digest(buf: memoryview, hlen: int) -> int:
    h = xxhash.xxh3_64()
    h.update(buf[:56])
    h.update(buf[64:hlen])
    return h.intdigest()


def decode_header(buf: memoryview, *, max_header_bytes: int = 64 << 20,
                  payload_inline: bool = True) -> BucketHeader:
    """Parse and validate a bucket header from untrusted bytes.

    Raises :class:`WireFormatError` for anything malformed or truncated, and
    :class:`CorruptBucketError` when the header checksum does not match. ``payload_inline=False``:
    ``buf`` holds the header only (the caller checks the payload where it lives).
    """
    buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
    if len(buf) < _PREFIX.size:
        raise WireFormatError(f"truncated bucket: {len(buf)} bytes, header needs at least {_PREFIX.size}")
    (magic, fmt, flags, hlen, n, version, index, _r, plen, pxx, session,
     hxx) = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise WireFormatError(f"not a hotweights bucket (magic {bytes(magic)!r})")
    if fmt != FORMAT_VERSION:
        raise WireFormatError(f"bucket format {fmt} is not supported (this build reads {FORMAT_VERSION})")
    if flags & ~KNOWN_FLAGS:
        raise WireFormatError(f"bucket has unknown flags {flags:#x}")
    if hlen % ALIGN or hlen < _PREFIX.size + _ENTRY.size * n or hlen > max_header_bytes:
        raise WireFormatError(f"bad header length {hlen} for {n} entries")
    if hlen > len(buf):
        raise WireFormatError(f"truncated bucket: header says {hlen} bytes, only {len(buf)} present")
    if payload_inline and hlen + plen > len(buf):
        raise WireFormatError(
            f"truncated bucket: header+payload need {hlen + plen} bytes, only {len(buf)} present")
    if _header_digest(buf, hlen) != hxx:
        raise CorruptBucketError(f"bucket {index} of version {version}: header checksum mismatch")
    entries = []
    for i in range(n):
        (name_off, name_len, dims_off, ndim, dcode, enc, _f, _r2, poff, pnb, estart, ecount,
         txx) = _ENTRY.unpack_from(buf, _PREFIX.size + _ENTRY.size * i)
        where = f"bucket {index} entry {i}"
        if name_len == 0 or name_off < _PREFIX.size or name_off + name_len > hlen:
            raise WireFormatError(f"{where}: name out of bounds")
        try:
            name = bytes(buf[name_off:name_off + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError(f"{where}: name is not UTF-8") from None
        if ndim > MAX_NDIM or dims_off % 8 or dims_off < _PREFIX.size or dims_off + 8 * ndim > hlen:
            raise WireFormatError(f"{where} ({name}): shape out of bounds")
        shape = struct.unpack_from(f"<{ndim}Q", buf, dims_off) if ndim else ()
        dtype = code_dtype(dcode)
        if enc not in KNOWN_ENCODINGS:
            raise WireFormatError(f"{where} ({name}): unknown encoding {enc}")
        numel = math.prod(shape)
        if ecount > numel or estart > numel - ecount:
            raise WireFormatError(f"{where} ({name}): elements [{estart}, +{ecount}) outside {numel}")
        if poff % ALIGN or poff + pnb > plen:
            raise WireFormatError(f"{where} ({name}): payload range out of bounds")
        if enc == ENC_DENSE and pnb != ecount * itemsize(dtype):
            raise WireFormatError(f"{where} ({name}): {pnb} payload bytes for {ecount} x {dtype}")
        entries.append(Entry(name, dtype, tuple(shape), estart, ecount, poff, pnb, enc, txx))
    return BucketHeader(version, index, session, hlen, plen, pxx, tuple(entries), flags)


def verify_payload(buf: memoryview, header: BucketHeader) -> None:
    """Raise :class:`CorruptBucketError` unless the payload matches its checksum."""
    got = xxhash.xxh3_64_intdigest(buf[header.header_len:header.header_len + header.payload_len])
    if got != header.payload_xxh3:
        raise CorruptBucketError(
            f"bucket {header.index} of version {header.version}: payload checksum mismatch "
            f"({got:016x} != {header.payload_xxh3:016x}); the bucket was rejected")


def decode_bucket(buf: memoryview, *, max_header_bytes: int = 64 << 20) -> BucketHeader:
    """Header validation plus payload checksum: the full check a receiver runs before staging."""
    header = decode_header(buf, max_header_bytes=max_header_bytes)
    if header.flags & FLAG_DEVICE:
        raise WireFormatError(f"bucket {header.index} of version {header.version} is a device bucket "
                              "(its payload is in GPU memory) but arrived over a host path")
    verify_payload(buf, header)
    return header
