"""Sparse delta codec: the elements of a tensor range that changed since a base version, losslessly.

An entry with ``encoding == ENC_DELTA`` (wire/bucket.py) carries, instead of the dense elements of
``[elem_start, elem_start + elem_count)``, the difference between those elements now and in
``base_version``, compared bit for bit (never with a float tolerance). The receiver rebuilds the new
elements from its own copy of the base version and checks them against the entry's ``tensor_xxh3``
(xxh3-64 of the new elements' bytes) before it stages anything. Every array operation is a numpy
vector operation; nothing loops over elements in Python.

Elements are handled as unsigned integers of their item size (1, 2, 4 or 8 bytes): bf16 0x3f80 is
the integer 16256. For a changed element the *difference* ``d = (new - old) mod 2**bits``, read as a
signed integer, is stored as a sign bit and a magnitude ``|d| >= 1``. Small weight updates move a
float by one or a few units in the last place, so most magnitudes are 1 or 2; the Elias-gamma code
below spends 1 bit on a magnitude of 1 and 3 bits on 2 or 3.

Payload layout (little-endian; 48-byte header, then the body)::

    off size
    0   4    magic        b"HWD1"
    4   1    flags        bit 0: the body is one zstd frame (SyncConfig.delta_zstd); others 0
    5   1    positions    0 nothing changed, 1 Elias-Fano, 2 bitmap, 3 every element changed
    6   1    values       1: sign + Elias-gamma magnitude of the integer difference (the only one)
    7   1    itemsize     bytes per element: 1, 2, 4 or 8
    8   1    low_bits     Elias-Fano: low bits L per position (0..63); 0 otherwise
    9   7    reserved     0
    16  8    count        elements in the range (equals the entry's elem_count)
    24  8    n_changed    n, the number of elements whose bytes differ
    32  8    base_version the version whose bytes this delta applies to
    40  8    class_bits   length in bits of the magnitude-class stream (section 4)

Body: five bit streams, each starting on a byte boundary and padded with zero bits to a whole byte.
Bits are filled least significant first (bit j of a stream is ``byte[j // 8] >> (j % 8) & 1``); a
"field" of w bits holds its value's low bit first.

1. Elias-Fano low parts (positions = 1): n fields of L bits, ``p_i mod 2**L`` for the sorted changed
   positions p_0 < p_1 < ... (``ceil(n * L / 8)`` bytes).
2. Elias-Fano high parts (positions = 1): ``H = n + ((count - 1) >> L)`` bits with bit
   ``(p_i >> L) + i`` set for each i. Bitmap (positions = 2): ``count`` bits, bit p set when element
   p changed. Nothing for positions 0 and 3.
3. Signs: n bits, bit i set when the difference of the i-th changed element is negative.
4. Magnitude classes: for each changed element, ``k_i - 1`` zero bits then a one bit, where
   ``k_i`` (1 .. 8 * itemsize) is the bit length of its magnitude. ``class_bits = sum(k_i)``.
5. Mantissas: n fields of ``k_i - 1`` bits: the magnitude without its leading one bit.

The encoder picks the smaller of Elias-Fano (about ``2 + log2(count / n)`` bits per position, near
the entropy of a random subset) and the bitmap (``count / n`` bits per position) for each range;
Elias-Fano's L minimises its exact size. Total sizes are known before anything is written, so the
publisher can fall back to a dense entry whenever that is smaller (``SyncConfig.delta="auto"``).

With the zstd flag the body is a single zstd frame that decompresses to exactly the size the header
implies. :func:`decode` validates every length, count and position against the header and the range
before it trusts them; anything malformed or truncated raises :class:`WireFormatError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import WireFormatError, missing_dependency

MAGIC = b"HWD1"
HEADER = struct.Struct("<4sBBBBB7xQQQQ")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 48

FLAG_ZSTD = 1
POS_NONE, POS_ELIAS_FANO, POS_BITMAP, POS_ALL = 0, 1, 2, 3
VAL_SIGN_GAMMA = 1

UINT_TYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SAMPLE = 1 << 15
"""Changed elements looked at to estimate the size of a dense-ish delta before computing it all."""


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    flags: int
    positions: int
    values: int
    itemsize: int
    low_bits: int
    count: int
    n_changed: int
    base_version: int
    class_bits: int

    @property
    def zstd(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)


# ---------------------------------------------------------------------------------------------- bits
def _nbytes(bits: int) -> int:
    return (bits + 7) >> 3


def _ones(positions: np.ndarray, nbits: int) -> np.ndarray:
    """A stream of ``nbits`` bits with exactly the given bit positions set."""
    bits = np.zeros(_nbytes(nbits) * 8, dtype=np.uint8)
    bits[positions] = 1
    return np.packbits(bits, bitorder="little")


def _pack_fields(values: np.ndarray, widths: np.ndarray | int, total_bits: int) -> np.ndarray:
    """Write ``values[i]`` as a ``widths[i]``-bit field (0..64), fields back to back, LSB first.

    Fields are split into sub-fields of at most 32 bits, each placed into 32-bit words with a
    shift; sub-fields never overlap, so adding their parts per word (``np.bincount``, exact in
    float64 below 2**53) is the same as OR-ing them, without a Python loop over elements.
    """
    n = len(values)
    if n == 0 or total_bits == 0:
        return np.zeros(_nbytes(total_bits), dtype=np.uint8)
    values = values.astype(np.uint64, copy=False)
    if np.ndim(widths) == 0:
        w = int(widths)
        offsets = np.arange(0, n * w, w, dtype=np.int64)
        wide = np.arange(n) if w > 32 else None
        low = values & np.uint64((1 << min(w, 32)) - 1)
    else:
        w_arr = np.asarray(widths, dtype=np.int64)
        offsets = np.cumsum(w_arr) - w_arr
        wide = np.flatnonzero(w_arr > 32)
        low = values & ((np.uint64(1) << np.minimum(w_arr, 32).astype(np.uint64)) - np.uint64(1))
    nwords = (total_bits + 31) // 32 + 2
    acc = np.zeros(nwords, dtype=np.float64)
    _add_subfields(acc, low, offsets)
    if wide is not None and len(wide):
        _add_subfields(acc, values[wide] >> np.uint64(32), offsets[wide] + 32)
    words = acc.astype("<u4")
    return words.view(np.uint8)[:_nbytes(total_bits)].copy()


def _add_subfields(acc: np.ndarray, values: np.ndarray, offsets: np.ndarray) -> None:
    word = offsets >> 5
    shifted = values << (offsets & 31).astype(np.uint64)
    acc += np.bincount(word, weights=(shifted & np.uint64(0xFFFFFFFF)).astype(np.float64),
                       minlength=len(acc))[:len(acc)]
    acc += np.bincount(word + 1, weights=(shifted >> np.uint64(32)).astype(np.float64),
                       minlength=len(acc))[:len(acc)]


def _unpack_fields(stream: np.ndarray, widths: np.ndarray | int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack_fields`: read n fields of the given widths (0..64).

    Each field lies within two consecutive 64-bit words of the stream, so two word gathers and
    shifts extract all fields at once.
    """
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if np.ndim(widths) == 0:
        w = int(widths)
        if w == 0:
            return np.zeros(n, dtype=np.uint64)
        offsets = np.arange(0, n * w, w, dtype=np.int64)
        mask: np.ndarray | np.uint64 = np.uint64((1 << w) - 1)
    else:
        w_arr = np.asarray(widths, dtype=np.int64)
        offsets = np.cumsum(w_arr) - w_arr
        mask = _mask(w_arr) if w_arr.max() >= 64 else (
            (np.uint64(1) << w_arr.astype(np.uint64)) - np.uint64(1))
    words = np.zeros(len(stream) // 8 + 2, dtype="<u8")
    words.view(np.uint8)[:len(stream)] = stream
    index = offsets >> 6
    shift = (offsets & 63).astype(np.uint64)
    # (x << 1) << (63 - s) is x << (64 - s) without the undefined shift by 64 when s == 0.
    out = (words[index] >> shift) | ((words[index + 1] << np.uint64(1)) << (np.uint64(63) - shift))
    return out & mask


def _mask(widths: np.ndarray) -> np.ndarray:
    w = widths.astype(np.uint64)
    full = w >= np.uint64(64)
    m = (np.uint64(1) << np.where(full, np.uint64(0), w)) - np.uint64(1)
    return np.where(full, np.uint64(0xFFFFFFFFFFFFFFFF), m)


def _bit_length(m: np.ndarray) -> np.ndarray:
    """Exact bit length of unsigned integers (0 for 0), from float exponents (exact below 2**53)."""
    if m.dtype.itemsize <= 4:
        return np.frexp(m.astype(np.float64))[1].astype(np.int64)
    hi = (m >> np.uint64(32)).astype(np.float64)
    lo = (m & np.uint64(0xFFFFFFFF)).astype(np.float64)
    return np.where(hi > 0, np.frexp(hi)[1] + 32, np.frexp(lo)[1]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- sizes
def _best_low_bits(n: int, count: int) -> int:
    guess = max((count // n).bit_length() - 1, 0)  # floor(log2(count / n)), the textbook choice
    candidates = range(max(guess - 2, 0), min(guess + 3, 64))
    return min(candidates, key=lambda low: (_ef_nbytes(n, count, low), low))


def _ef_nbytes(n: int, count: int, low: int) -> int:
    return _nbytes(n * low) + _nbytes(n + ((count - 1) >> low))


def _position_layout(n: int, count: int) -> tuple[int, int, int]:
    """(format, low_bits, bytes) of the smallest position encoding for n of count elements."""
    if n == 0:
        return POS_NONE, 0, 0
    if n == count:
        return POS_ALL, 0, 0
    low = _best_low_bits(n, count)
    ef = _ef_nbytes(n, count, low)
    bitmap = _nbytes(count)
    return (POS_ELIAS_FANO, low, ef) if ef <= bitmap else (POS_BITMAP, 0, bitmap)


def _body_nbytes(h: DeltaHeader) -> int:
    pos = {POS_NONE: 0, POS_ALL: 0, POS_BITMAP: _nbytes(h.count),
           POS_ELIAS_FANO: _ef_nbytes(h.n_changed, h.count, h.low_bits) if h.n_changed else 0}[h.positions]
    return pos + _nbytes(h.n_changed) + _nbytes(h.class_bits) + _nbytes(h.class_bits - h.n_changed)


# ---------------------------------------------------------------------------------------------- encode
def uint_view(a: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers of the item size (raises for unsupported sizes)."""
    kind = UINT_TYPES.get(a.dtype.itemsize)
    if kind is None:
        raise WireFormatError(f"delta encoding needs 1-, 2-, 4- or 8-byte elements, got {a.dtype}")
    return a.view(kind)


def changed_positions(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Sorted positions whose bytes differ (bit-wise compare of the unsigned views)."""
    ne = old != new
    if not ne.any():
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(ne)


@dataclass
class DeltaPlan:
    """What changed in one range, and the exact size of its delta payload (before zstd)."""

    count: int
    itemsize: int
    positions: np.ndarray
    negative: np.ndarray
    classes: np.ndarray
    mantissas: np.ndarray
    pos_format: int
    low_bits: int
    nbytes: int

    @property
    def n_changed(self) -> int:
        return len(self.positions)


def _magnitudes(old_vals: np.ndarray, new_vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed difference as (negative?, magnitude), in the element's own unsigned type, and the
    magnitudes' bit lengths."""
    kind = old_vals.dtype.type
    d = new_vals - old_vals  # wraps modulo 2**bits in the unsigned type
    negative = d >= kind(1 << (8 * old_vals.dtype.itemsize - 1))
    mag = np.where(negative, kind(0) - d, d)  # two's complement magnitude, also wrapping
    return negative, mag, _bit_length(mag)


def analyze(old: np.ndarray, new: np.ndarray, positions: Optional[np.ndarray] = None, *,
            limit: Optional[int] = None) -> Optional[DeltaPlan]:
    """Find the changed elements of ``new`` versus ``old`` (same-length unsigned arrays).

    With ``limit``, returns None as soon as the payload is known to need ``limit`` bytes or more
    (e.g. the dense size): beyond ``_SAMPLE`` changed elements an evenly spaced sample estimates
    the magnitude cost first, so a dense-ish range is never analysed in full for nothing.
    """
    if old.shape != new.shape or old.dtype != new.dtype or old.ndim != 1:
        raise WireFormatError(f"delta needs two 1-D arrays of one dtype, got {old.shape}/{old.dtype} "
                              f"and {new.shape}/{new.dtype}")
    count, itemsize = len(old), old.dtype.itemsize
    if positions is None:
        positions = changed_positions(old, new)
    n = len(positions)
    pos_format, low, pos_bytes = _position_layout(n, count)
    fixed = HEADER_SIZE + pos_bytes + _nbytes(n)
    if limit is not None and n > _SAMPLE:
        sample = positions[:: n // _SAMPLE]
        _, _, k = _magnitudes(np.take(old, sample), np.take(new, sample))
        if fixed + 2 * int(k.sum()) * n / len(sample) / 8 >= limit:
            return None
    negative, mag, k = _magnitudes(np.take(old, positions), np.take(new, positions))
    class_bits = int(k.sum())
    nbytes = fixed + _nbytes(class_bits) + _nbytes(class_bits - n)
    if limit is not None and nbytes >= limit:
        return None
    kind = mag.dtype.type
    mantissas = mag ^ (kind(1) << np.maximum(k - 1, 0).astype(mag.dtype))
    mantissas[k == 0] = 0  # never for changed elements; keeps a bad caller from writing garbage
    return DeltaPlan(count, itemsize, positions, negative, k, mantissas, pos_format, low, nbytes)


def serialize(plan: DeltaPlan, base_version: int, *, zstd_level: Optional[int] = None,
              changed_mask: Optional[np.ndarray] = None) -> bytes:
    """The payload bytes of ``plan`` (optionally zstd-compressed body)."""
    n, count = plan.n_changed, plan.count
    parts: list[np.ndarray] = []
    if plan.pos_format == POS_ELIAS_FANO:
        low = plan.low_bits
        p = plan.positions.astype(np.uint64)
        parts.append(_pack_fields(p & np.uint64((1 << low) - 1), low, n * low))
        high = (p >> np.uint64(low)).astype(np.int64) + np.arange(n, dtype=np.int64)
        parts.append(_ones(high, n + ((count - 1) >> low)))
    elif plan.pos_format == POS_BITMAP:
        if changed_mask is None:
            parts.append(_ones(plan.positions, count))
        else:
            parts.append(np.packbits(changed_mask, bitorder="little"))
    parts.append(np.packbits(plan.negative, bitorder="little") if n else np.zeros(0, np.uint8))
    k = plan.classes
    class_bits = int(k.sum())
    parts.append(_ones(np.cumsum(k) - 1, class_bits) if n else np.zeros(0, np.uint8))
    parts.append(_pack_fields(plan.mantissas, np.maximum(k - 1, 0), class_bits - n))
    body = b"".join(part.tobytes() for part in parts)
    flags = 0
    if zstd_level is not None and body:
        body = _zstd().ZstdCompressor(level=zstd_level).compress(body)
        flags |= FLAG_ZSTD
    head = HEADER.pack(MAGIC, flags, plan.pos_format, VAL_SIGN_GAMMA, plan.itemsize, plan.low_bits,
                       count, n, base_version, class_bits)
    return head + body


def encode(old: np.ndarray, new: np.ndarray, base_version: int, *,
           zstd_level: Optional[int] = None) -> bytes:
    """Delta payload that turns ``old`` into ``new`` (arrays of any 1/2/4/8-byte dtype)."""
    old_u, new_u = uint_view(np.ascontiguousarray(old).reshape(-1)), uint_view(np.ascontiguousarray(new).reshape(-1))
    plan = analyze(old_u, new_u)
    assert plan is not None  # no limit given
    return serialize(plan, base_version, zstd_level=zstd_level)


# ---------------------------------------------------------------------------------------------- decode
def read_header(payload: memoryview | bytes | np.ndarray) -> DeltaHeader:
    """Parse and sanity-check the fixed header of an untrusted delta payload."""
    raw = memoryview(payload).cast("B") if not isinstance(payload, np.ndarray) else memoryview(payload.view(np.uint8))
    if len(raw) < HEADER_SIZE:
        raise WireFormatError(f"truncated delta payload: {len(raw)} bytes, the header alone needs {HEADER_SIZE}")
    magic, flags, pos, vals, itemsize, low, count, n, base, class_bits = HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise WireFormatError(f"not a delta payload (magic {bytes(magic)!r})")
    if flags & ~FLAG_ZSTD:
        raise WireFormatError(f"delta payload has unknown flags {flags:#x}")
    if pos not in (POS_NONE, POS_ELIAS_FANO, POS_BITMAP, POS_ALL):
        raise WireFormatError(f"delta payload has unknown position format {pos}")
    if vals != VAL_SIGN_GAMMA:
        raise WireFormatError(f"delta payload has unknown value format {vals}")
    if itemsize not in UINT_TYPES:
        raise WireFormatError(f"delta payload has item size {itemsize}")
    if n > count or low > 63 or (pos != POS_ELIAS_FANO and low):
        raise WireFormatError(f"delta payload header is inconsistent ({n} of {count} changed, L={low})")
    if (pos == POS_NONE) != (n == 0) or (pos == POS_ALL and n != count):
        raise WireFormatError(f"delta payload: position format {pos} does not fit {n} of {count} changed")
    if not n <= class_bits <= n * 8 * itemsize:
        raise WireFormatError(f"delta payload: {class_bits} class bits for {n} changed elements")
    return DeltaHeader(flags, pos, vals, itemsize, low, count, n, base, class_bits)


def _unzstd(frame: bytes, expected: int) -> bytes:
    """The zstd frame decompressed, never to more than ``expected`` bytes.

    ``max_output_size`` alone does not bound memory: the decompressor trusts a content size written
    in the frame header, and a corrupted header can claim terabytes. The declared size is checked
    first, and a frame that declares none is read through a bounded stream.
    """
    zstd = _zstd()
    try:
        declared = zstd.frame_content_size(frame)
        if declared > expected:
            raise WireFormatError(f"delta payload: zstd frame declares {declared} bytes, "
                                  f"header implies {expected}")
        if declared >= 0:
            return zstd.ZstdDecompressor().decompress(frame, max_output_size=expected)
        out = bytearray()
        with zstd.ZstdDecompressor().stream_reader(frame) as reader:
            while len(out) <= expected:  # one byte more than expected: an oversized body is reported
                chunk = reader.read(expected + 1 - len(out))
                if not chunk:
                    break
                out += chunk
        return bytes(out)
    except zstd.ZstdError as exc:
        raise WireFormatError(f"delta payload: zstd body does not decompress: {exc}") from None


def decode(payload: memoryview | bytes | np.ndarray, base: np.ndarray, *,
           out: Optional[np.ndarray] = None) -> tuple[np.ndarray, DeltaHeader]:
    """Apply a delta payload to ``base`` (1-D unsigned array); returns the new array and the header.

    ``base`` is never modified: the result goes to ``out`` (a fresh copy of ``base`` by default).
    Raises :class:`WireFormatError` for any malformed, truncated or inconsistent payload.
    """
    h = read_header(payload)
    raw = memoryview(payload).cast("B") if not isinstance(payload, np.ndarray) else memoryview(payload.view(np.uint8))
    if base.ndim != 1 or len(base) != h.count:
        raise WireFormatError(f"delta payload is for {h.count} elements, the base has {base.size}")
    if base.dtype.itemsize != h.itemsize:
        raise WireFormatError(f"delta payload is for {h.itemsize}-byte elements, the base has {base.dtype}")
    base = uint_view(base)
    expected = _body_nbytes(h)
    body_raw = raw[HEADER_SIZE:]
    if h.zstd:
        body = _unzstd(bytes(body_raw), expected)
    else:
        body = body_raw
    if len(body) != expected:
        what = "truncated" if len(body) < expected else "oversized"
        raise WireFormatError(f"{what} delta payload: body has {len(body)} bytes, header implies {expected}")
    stream = np.frombuffer(body, dtype=np.uint8)
    n, count = h.n_changed, h.count
    result = out if out is not None else base.copy()
    if out is not None:
        np.copyto(uint_view(out), base)
    if n == 0:
        return result, h
    cursor = 0

    def take(nbytes: int) -> np.ndarray:
        nonlocal cursor
        part = stream[cursor:cursor + nbytes]
        cursor += nbytes
        return part

    if h.positions == POS_ALL:
        positions = np.arange(count, dtype=np.int64)
    elif h.positions == POS_BITMAP:
        positions = _set_bits(take(_nbytes(count)), count, n, "bitmap")
    else:
        low = h.low_bits
        lows = _unpack_fields(take(_nbytes(n * low)), low, n)
        nbits = n + ((count - 1) >> low)
        highs = _set_bits(take(_nbytes(nbits)), nbits, n, "Elias-Fano high part")
        highs = highs - np.arange(n, dtype=np.int64)
        positions = (highs.astype(np.uint64) << np.uint64(low)) | lows
        positions = positions.astype(np.int64)
        if (len(positions) > 1 and not np.all(positions[1:] > positions[:-1])) or positions[-1] >= count:
            raise WireFormatError("delta payload: Elias-Fano positions are not increasing within the range")
    negative = np.unpackbits(take(_nbytes(n)), count=n, bitorder="little").astype(bool)
    ends = _set_bits(take(_nbytes(h.class_bits)), h.class_bits, n, "magnitude classes")
    if ends[-1] != h.class_bits - 1:
        raise WireFormatError("delta payload: magnitude class stream does not end where the header says")
    k = np.empty(n, dtype=np.int64)
    k[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=k[1:])
    if k.max() > 8 * h.itemsize:
        raise WireFormatError("delta payload: magnitude wider than the element")
    mant = _unpack_fields(take(_nbytes(h.class_bits - n)), k - 1, n)
    mag = mant | (np.uint64(1) << (k - 1).astype(np.uint64))
    kind = base.dtype.type
    old_vals = base[positions]
    mag_t = mag.astype(kind)  # keeps the low bits: exact modulo 2**bits
    result_u = uint_view(result)
    result_u[positions] = np.where(negative, old_vals - mag_t, old_vals + mag_t)
    return result, h


def _set_bits(stream: np.ndarray, nbits: int, expect: int, what: str) -> np.ndarray:
    bits = np.unpackbits(stream, bitorder="little")
    ones = np.flatnonzero(bits)
    if len(ones) != expect or (expect and ones[-1] >= nbits):
        raise WireFormatError(f"delta payload: {what} has {len(ones)} set bits (within {nbits}), "
                              f"expected {expect}")
    return ones


def _zstd():
    try:
        import zstandard
    except ImportError as exc:
        raise missing_dependency("zstandard", "zstd") from exc
    return zstandard


__all__ = ["encode", "decode", "analyze", "serialize", "read_header", "uint_view",
           "changed_positions", "DeltaPlan", "DeltaHeader", "HEADER_SIZE", "MAGIC", "UINT_TYPES"]
