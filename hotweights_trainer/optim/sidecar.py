"""The checkpoint sidecar: which weights a checkpoint's optimizer state was computed for.

``write_sidecar`` stores, next to a checkpoint, the hotweights version and step plus one fingerprint
per parameter: xxh3-64 over its dtype, shape and raw bytes (``verify.tensor_digest``). On resume,
``compare`` tells which parameters the run now holds with other bytes; those are the *updated* ones an
optimizer policy applies to. The file is JSON, written atomically, and validated field by field when
read back: it comes from disk and is treated like any other untrusted input.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch

from ..errors import SidecarError
from ..naming import strip_wrappers
from ..source import unwrap_model
from ..verify import tensor_digest

SIDECAR_NAME = "hotweights_sidecar.json"
FORMAT = "hotweights-weights-sidecar"
FORMAT_VERSION = 1
MAX_SIDECAR_BYTES = 256 << 20  # about 2 million tensors: far above any model, far below memory trouble

_DIGEST = re.compile(r"^[0-9a-f]{16}$")
_DTYPES = {str(getattr(torch, n)) for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32",
                                          "int16", "int8", "uint8", "bool", "complex64", "complex128")}


@dataclass(frozen=True)
class TensorPrint:
    digest: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Sidecar:
    tensors: dict[str, TensorPrint]
    step: Optional[int] = None
    version: Optional[int] = None


@dataclass
class Comparison:
    """Names sorted into what changed since the sidecar was written."""

    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    shape_changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """In the sidecar, not in the current weights."""
    new: list[str] = field(default_factory=list)
    """In the current weights, not in the sidecar: no record, so they count as updated."""


def fingerprint(t: torch.Tensor) -> TensorPrint:
    return TensorPrint(tensor_digest(t), tuple(int(s) for s in t.shape), str(t.dtype))


def _named_parameters(model: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Each parameter once (tied weights under their first name), wrapper prefixes stripped."""
    for name, p in unwrap_model(model).named_parameters():
        yield strip_wrappers(name), p


def is_partitioned(model: Any) -> bool:
    """Whether ``model`` holds ZeRO-3 partitioned parameters (fingerprinting them needs gathers)."""
    return any(hasattr(p, "ds_id") for _, p in _named_parameters(model))


def sidecar_needed(model: Any, policy: str) -> bool:
    """Whether a checkpoint of ``model`` should get a sidecar under optimizer ``policy``.

    ``preserve`` keeps every optimizer state on resume whatever the sidecar says; the sidecar then
    only feeds the report and ``opt-check`` previews. That is worth its price for replicated
    parameters (a hash per parameter), not for ZeRO-3 ones, which every rank would gather on every
    save.
    """
    return policy != "preserve" or not is_partitioned(model)


def model_fingerprints(model: Any) -> dict[str, TensorPrint]:
    """Fingerprints of a model's parameters. With ZeRO-3, every rank must call this: partitioned
    parameters are gathered one at a time (memory stays bounded by the largest parameter)."""
    out: dict[str, TensorPrint] = {}
    for name, p in _named_parameters(model):
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = fingerprint(p.data)
        else:
            out[name] = fingerprint(p.data)
    return out


def tensors_fingerprints(items: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
                         ) -> dict[str, TensorPrint]:
    pairs = items.items() if isinstance(items, Mapping) else items
    return {strip_wrappers(name): fingerprint(t) for name, t in pairs}


def sidecar_path(directory: Union[str, os.PathLike]) -> Path:
    path = Path(directory)
    return path if path.suffix == ".json" else path / SIDECAR_NAME


def write_sidecar(directory: Union[str, os.PathLike], model: Any, *, step: Optional[int] = None,
                  version: Optional[int] = None, is_main: bool = True) -> Optional[Path]:
    """Fingerprint ``model`` and write the sidecar into ``directory`` (atomically: temp file + rename).

    Call it on every rank (ZeRO-3 gathers); only ``is_main`` writes. Returns the path written, or None.
    """
    if not is_main and not is_partitioned(model):
        return None  # nothing to gather: only the main rank needs the fingerprints
    prints = model_fingerprints(model)
    if not is_main:
        return None
    target = sidecar_path(directory)
    if not target.parent.is_dir():
        raise SidecarError(
            f"checkpoint folder {str(target.parent)!r} does not exist; cannot write the sidecar")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "version": version,
           "tensors": {name: {"digest": t.digest, "shape": list(t.shape), "dtype": t.dtype}
                       for name, t in prints.items()}}
    fd, tmp = tempfile.mkstemp(prefix=".hotweights_sidecar.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, sort_keys=True)
        os.replace(tmp, target)
    except BaseException:  # cleanup only: never leave a half-written temp file behind, then re-raise
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_sidecar(directory: Union[str, os.PathLike]) -> Sidecar:
    """Read and validate a sidecar (a checkpoint folder or the JSON file itself)."""
    path = sidecar_path(directory)
    if not path.is_file():
        raise SidecarError(f"no hotweights sidecar at {str(path)!r} (checkpoints written by "
                           "HotweightsCallback or write_sidecar have one)")
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise SidecarError(f"sidecar {str(path)!r} is {path.stat().st_size} bytes, over the "
                           f"{MAX_SIDECAR_BYTES}-byte limit")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SidecarError(f"sidecar {str(path)!r} is not readable JSON: {exc}") from None
    return parse_sidecar(doc, source=str(path))


def _optional_int(doc: dict, key: str, source: str) -> Optional[int]:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SidecarError(f"sidecar {source}: {key!r} must be a non-negative integer or null, got {value!r}")
    return value


def parse_sidecar(doc: Any, *, source: str = "<memory>") -> Sidecar:
    if not isinstance(doc, dict):
        raise SidecarError(f"sidecar {source}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise SidecarError(f"sidecar {source}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise SidecarError(f"sidecar {source}: unsupported format_version {doc.get('format_version')!r} "
                           f"(this library reads {FORMAT_VERSION})")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise SidecarError(f"sidecar {source}: 'tensors' must be an object of name -> fingerprint")
    prints: dict[str, TensorPrint] = {}
    for name, entry in tensors.items():
        where = f"sidecar {source}: tensor {name!r}"
        if not name or not isinstance(entry, dict):
            raise SidecarError(f"{where}: expected a non-empty name and an object")
        digest, shape, dtype = entry.get("digest"), entry.get("shape"), entry.get("dtype")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise SidecarError(f"{where}: digest must be 16 lowercase hex digits, got {digest!r}")
        if (not isinstance(shape, list) or len(shape) > 32
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape)):
            raise SidecarError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SidecarError(f"{where}: unknown dtype {dtype!r}")
        if math.prod(shape) > 1 << 48:
            raise SidecarError(f"{where}: implausible shape {shape!r}")
        prints[name] = TensorPrint(digest, tuple(shape), dtype)
    return Sidecar(tensors=prints, step=_optional_int(doc, "step", source),
                   version=_optional_int(doc, "version", source))


def compare(sidecar: Sidecar, current: Mapping[str, TensorPrint]) -> Comparison:
    out = Comparison()
    for name in sorted(set(sidecar.tensors) | set(current)):
        old, now = sidecar.tensors.get(name), current.get(name)
        if old is None:
            out.new.append(name)
        elif now is None:
            out.missing.append(name)
        elif old == now:
            out.unchanged.append(name)
        else:
            out.updated.append(name)
            if old.shape != now.shape:
                out.shape_changed.append(name)
    return out
