"""What a policy will do, before a run resumes: the numbers behind ``hotweights opt-check``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ConfigError, SidecarError, missing_dependency
from .policy import effective_update_scale, validate_policy
from .sidecar import TensorPrint, compare, fingerprint, read_sidecar, sidecar_path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def expected_counts(updated: int, unchanged: int, policy: str, attenuation: float, *,
                    shape_changed: int = 0) -> dict[str, Any]:
    """Counts :func:`apply_policy` will report when ``updated`` parameters changed (every one with
    optimizer state), plus the scale of the stale moments in the first update."""
    policy, attenuation = validate_policy(policy, attenuation)
    for label, n in (("updated", updated), ("unchanged", unchanged), ("shape_changed", shape_changed)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{label} must be a non-negative integer, got {n!r}")
    if shape_changed > updated:
        raise ConfigError(f"shape_changed ({shape_changed}) cannot exceed updated ({updated})")
    same_shape = updated - shape_changed
    return {
        "policy": policy, "attenuation": attenuation, "updated": updated, "unchanged": unchanged,
        "preserved": unchanged + (same_shape if policy == "preserve" else 0),
        "attenuated": same_shape if policy == "attenuate" else 0,
        "reset": shape_changed + (same_shape if policy == "reset" else 0),
        "moment_scale": {"preserve": 1.0, "attenuate": attenuation, "reset": 0.0}[policy],
        "effective_update_scale": effective_update_scale(policy, attenuation),
        "sgd_momentum_scale": {"preserve": 1.0, "attenuate": attenuation, "reset": 0.0}[policy],
        "explanation": explain(policy, attenuation),
    }


def explain(policy: str, attenuation: float) -> list[str]:
    if policy == "preserve":
        return ["updated parameters keep their moments: the first Adam update still follows the old "
                "direction at full strength (scale 1.0)"]
    if policy == "reset":
        return ["updated parameters get fresh optimizer state (moments zero, step 0): their first Adam "
                "update equals a fresh optimizer's first step, about lr * sign(grad), with no trace of "
                "the old direction"]
    a, s = attenuation, math.sqrt(attenuation)
    lines = [f"both Adam moments are multiplied by a = {a:g}; the update follows m / sqrt(v), so the "
             f"stale direction's share scales by a / sqrt(a) = sqrt(a) = {s:.4f}, not by {a:g}",
             f"to shrink the stale share to a factor f, use attenuation = f**2 (f = 0.5 needs {0.25:g})",
             "step is kept, so Adam's bias correction continues; SGD momentum buffers scale by "
             f"a = {a:g} (one moment, no square root)"]
    if a == 0.0:
        lines.append("attenuation 0 zeroes the moments but keeps step: the next update is not a fresh first "
                     "step (bias correction uses the old step); use policy reset for that")
    return lines


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_files(path)
        return [path]
    if (path / WEIGHT_FILES[0]).is_file():
        return [path / WEIGHT_FILES[0]]
    if (path / WEIGHT_FILES[1]).is_file():
        return _index_files(path / WEIGHT_FILES[1])
    raise SidecarError(f"no weights to compare in {str(path)!r}: expected {' or '.join(WEIGHT_FILES)} "
                       "(pass --weights FILE.safetensors for other layouts)")


def _index_files(index: Path) -> list[Path]:
    try:
        doc = json.loads(index.read_text())
        shards = sorted(set(doc["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SidecarError(f"{str(index)!r} is not a valid safetensors index: {exc!r}") from None
    files = []
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise SidecarError(f"{str(index)!r} names an invalid shard {shard!r}")
        files.append(index.parent / shard)
    return files


def weight_file_fingerprints(path: Union[str, os.PathLike]) -> dict[str, TensorPrint]:
    """Fingerprints of every tensor in a safetensors file, an index of shards, or a folder with one."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:
        raise missing_dependency("safetensors", "hf") from exc
    out: dict[str, TensorPrint] = {}
    for file in _safetensors_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    out[name] = fingerprint(f.get_tensor(name))
        except (OSError, SafetensorError) as exc:
            raise SidecarError(f"cannot read weights {str(file)!r}: {exc}") from None
    return out


def preview_checkpoint(checkpoint: Union[str, os.PathLike], *,
                       weights: Optional[Union[str, os.PathLike]] = None, policy: str,
                       attenuation: float) -> dict[str, Any]:
    """What resuming from ``checkpoint`` with ``weights`` (default: the checkpoint's own model file,
    which is what HF Trainer loads) would do. Names only in the weights file (buffers, untracked
    tensors) are listed as ``untracked`` and not counted."""
    policy, attenuation = validate_policy(policy, attenuation)
    sidecar = read_sidecar(checkpoint)
    weights_path = Path(weights) if weights is not None else sidecar_path(checkpoint).parent
    diff = compare(sidecar, weight_file_fingerprints(weights_path))
    out = expected_counts(len(diff.updated), len(diff.unchanged), policy, attenuation,
                          shape_changed=len(diff.shape_changed))
    out.update({"checkpoint": str(checkpoint), "weights": str(weights_path), "step": sidecar.step,
                "version": sidecar.version, "updated_names": diff.updated,
                "shape_changed": diff.shape_changed, "missing": diff.missing, "untracked": diff.new})
    return out
