"""Stable one-byte codes for the dtypes that travel on the wire.

Codes never change meaning once released; new dtypes get new codes.
"""

from __future__ import annotations

import torch

from ..errors import WireFormatError

_CODES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.int8,
    6: torch.uint8,
    7: torch.int16,
    8: torch.int32,
    9: torch.int64,
    10: torch.bool,
    13: torch.complex64,
    14: torch.complex128,
}
for _code, _name in ((11, "float8_e4m3fn"), (12, "float8_e5m2"), (15, "uint16"), (16, "uint32"),
                     (17, "uint64")):
    if hasattr(torch, _name):
        _CODES[_code] = getattr(torch, _name)

_BY_DTYPE = {dt: code for code, dt in _CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise WireFormatError(f"dtype {dtype} cannot be sent; supported: "
                              f"{', '.join(str(d).replace('torch.', '') for d in _BY_DTYPE)}") from None


def code_dtype(code: int) -> torch.dtype:
    try:
        return _CODES[code]
    except KeyError:
        raise WireFormatError(f"unknown dtype code {code} in bucket header") from None


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
