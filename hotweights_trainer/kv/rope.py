"""RoPE snapshots and the exact un-rotate / re-rotate of cached keys.

A cached key is ``K = cos * k + sin * rotate_half(k)`` where ``cos``/``sin`` come from the model's
rotary embedding module (Hugging Face's convention, used by Llama, Mistral, Qwen, Gemma and most
decoder models; ``cos`` and ``sin`` may carry the module's attention scaling). Rotation by an angle
is orthogonal, so the un-rotated key is recovered exactly:

    k = (cos * K - sin * rotate_half(K)) / (cos**2 + sin**2)

and re-rotated with the new module's ``cos``/``sin``; both steps fold into one rotation whose
coefficients are computed in float64 (:func:`rotation_change`). The angles always come from the model's own
rotary module (a frozen copy taken when the cache was registered, and the live one), so every
``rope_type`` whose angles depend only on the position is handled the same way. Types whose angles
depend on the sequence length seen at the time (``dynamic``, ``longrope``) are refused.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

from ..errors import KVMigrationError

log = logging.getLogger(__name__)

# Angles of these types change with the length of the sequence at the time each token was cached,
# which the cache does not record: the old rotation cannot be reconstructed.
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def find_rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's rotary embedding modules (class name ends with RotaryEmbedding, has inv_freq)."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("RotaryEmbedding") and isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def _rope_parameters(module: torch.nn.Module) -> object:
    params = getattr(getattr(module, "config", None), "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else params


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeSnapshot:
    """A frozen copy of a model's rotary module(s): the angles a cache was computed with."""

    def __init__(self, modules: list[torch.nn.Module]):
        # Deep copies: the live module (or the config it reads) may be changed for the next version.
        self.modules = [copy.deepcopy(m) for m in modules]

    @classmethod
    def capture(cls, model: Optional[torch.nn.Module], rotary: Optional[torch.nn.Module] = None
                ) -> Optional["RopeSnapshot"]:
        if rotary is not None:
            return cls([rotary])
        if model is None:
            return None
        found = find_rotary_modules(model)
        return cls(found) if found else None

    @property
    def rope_types(self) -> list[str]:
        return [str(getattr(m, "rope_type", "default")) for m in self.modules]

    def describe(self) -> str:
        parts = []
        for m in self.modules:
            cfg = getattr(m, "config", None)
            params = getattr(cfg, "rope_parameters", None) or {}
            theta = params.get("rope_theta", getattr(cfg, "rope_theta", "?")) if isinstance(params, dict) else "?"
            parts.append(f"{type(m).__name__}(type={getattr(m, 'rope_type', 'default')}, theta={theta}, "
                         f"scaling={getattr(m, 'attention_scaling', 1.0)})")
        return ", ".join(parts)

    def same_as(self, other: "RopeSnapshot") -> bool:
        return self.matches(other.modules)

    def matches(self, modules: list[torch.nn.Module]) -> bool:
        """True when ``modules`` compute the same angles as this snapshot."""
        if len(self.modules) != len(modules):
            return False
        for a, b in zip(self.modules, modules):
            if type(a) is not type(b) or getattr(a, "rope_type", None) != getattr(b, "rope_type", None):
                return False
            if getattr(a, "attention_scaling", 1.0) != getattr(b, "attention_scaling", 1.0):
                return False
            if a.inv_freq.shape != b.inv_freq.shape or not torch.equal(a.inv_freq.cpu(), b.inv_freq.cpu()):
                return False
            if _rope_parameters(a) != _rope_parameters(b):  # e.g. a dynamic factor: same inv_freq until used
                return False
        return True

    def cos_sin(self, seq_len: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of positions ``0..seq_len-1`` as float64, shape ``[seq_len, rotary_dim]``."""
        if len(self.modules) != 1:
            raise KVMigrationError(f"the model has {len(self.modules)} rotary embeddings ({self.describe()}); "
                                   "which layers use which is unknown, so keys cannot be re-rotated")
        module = self.modules[0]
        rope_type = str(getattr(module, "rope_type", "default"))
        if rope_type in LENGTH_DEPENDENT_ROPE:
            raise KVMigrationError(f"rope_type {rope_type!r}: its angles depend on the sequence length when each "
                                   "token was cached, which is not recorded; recompute instead")
        module = module.to(device)
        positions = torch.arange(seq_len, device=device).unsqueeze(0)
        probe = torch.empty(0, dtype=torch.float32, device=device)  # only its dtype and device are read
        with torch.no_grad():
            cos, sin = module(probe, positions)
        if cos.dim() != 3 or cos.shape[:2] != (1, seq_len) or sin.shape != cos.shape:
            raise KVMigrationError(f"{type(module).__name__} returned cos of shape {tuple(cos.shape)}; expected "
                                   f"[1, {seq_len}, rotary_dim] (multi-axis position ids are not supported)")
        cos, sin = cos[0].double(), sin[0].double()
        rot = cos.shape[-1]
        if rot % 2 or rot > head_dim or not torch.equal(cos[:, : rot // 2], cos[:, rot // 2:]):
            raise KVMigrationError(f"{type(module).__name__} does not use the rotate_half layout "
                                   f"(rotary dim {rot}, head dim {head_dim}); keys cannot be re-rotated")
        return cos, sin


def rotation_change(old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (C, S) with ``new_K = C * K + S * rotate_half(K)``, computed in float64.

    Un-rotating is ``k = a*K - b*J(K)`` with ``a = cos/(cos^2+sin^2)``, ``b = sin/(cos^2+sin^2)`` and
    ``J = rotate_half``; re-rotating is ``cos'*k + sin'*J(k)``. As ``J(J(x)) = -x`` the two fold into
    one rotation: ``C = cos'*a + sin'*b``, ``S = sin'*a - cos'*b``.
    """
    (cos_o, sin_o), (cos_n, sin_n) = old, new
    norm = cos_o * cos_o + sin_o * sin_o
    a, b = cos_o / norm, sin_o / norm
    return cos_n * a + sin_n * b, sin_n * a - cos_n * b


def rerotate_keys(keys: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor],
                  new: tuple[torch.Tensor, torch.Tensor], seq_dim: int) -> torch.Tensor:
    """Un-rotate ``keys`` with ``old`` (cos, sin) and re-rotate with ``new``, as one rotation.

    ``keys`` has head_dim last and positions ``0..S-1`` along ``seq_dim``. With a partial rotary
    dimension (``rotary_dim < head_dim``) only the first ``rotary_dim`` features rotate. The
    coefficients are exact in float64; the rotation runs in float32 (float64 for float64 keys), so
    the result is within a few units in the last place of the keys' own precision.
    """
    compute = torch.promote_types(keys.dtype, torch.float32)
    coef_c, coef_s = rotation_change(old, new)
    rot = coef_c.shape[-1]
    shape = [1] * keys.dim()
    shape[seq_dim], shape[-1] = keys.shape[seq_dim], rot
    coef_c, coef_s = coef_c.to(compute).reshape(shape), coef_s.to(compute).reshape(shape)
    k = keys.to(compute)
    head = k[..., :rot]
    out = head * coef_c
    out.addcmul_(rotate_half(head), coef_s)
    if rot == k.shape[-1]:
        return out
    return torch.cat((out, k[..., rot:]), dim=-1)


def rope_needs_change(old: Optional[RopeSnapshot], new: Optional[RopeSnapshot]) -> bool:
    if old is None or new is None:
        return False
    return not old.same_as(new)
