"""Policies on ``torch.optim`` state: one dict of tensors and counters per parameter.

Which entries are moments: floating tensors shaped like the parameter (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``, ``max_exp_avg_sq``, Adagrad's ``sum``) and any other floating tensor of at least
one dimension (factored second moments, e.g. Adafactor's row and column statistics). Entries whose
key contains ``step`` are counters and are never scaled.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

_LAZY = object()  # marker: the optimizer creates state on first sight, so removing it is a reset


def is_counter(key: Any) -> bool:
    return isinstance(key, str) and "step" in key


def is_moment(key: Any, value: Any, param: torch.Tensor) -> bool:
    if is_counter(key) or not isinstance(value, torch.Tensor):
        return False
    if not (value.is_floating_point() or value.is_complex()):
        return False
    return value.dim() >= 1 or tuple(value.shape) == tuple(param.shape)


def shape_changed(state: dict, param: torch.Tensor) -> bool:
    """True when a full-rank moment can no longer belong to ``param`` (it was resized or reshaped).

    Factored statistics have fewer dimensions or broadcast to the parameter; a stale full moment of a
    resized parameter does neither.
    """
    for key, value in state.items():
        if not is_moment(key, value, param) or value.dim() == 0:
            continue
        if value.dim() > param.dim():
            return True
        if value.dim() == param.dim():
            try:
                if torch.broadcast_shapes(value.shape, param.shape) != param.shape:
                    return True
            except RuntimeError:
                return True
    return False


def _construct_like(optimizer: Any, group: dict, dummy: torch.nn.Parameter) -> Any:
    """A throwaway optimizer of the same class and hyper-parameters over ``dummy``."""
    cls = type(optimizer)
    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    ctor: dict[str, Any] = {}
    try:
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        ctor = {k: v for k, v in getattr(optimizer, "defaults", {}).items() if takes_any or k in params}
    except (TypeError, ValueError):  # no introspectable signature (C extension): rely on the group
        ctor = {}
    return cls([{"params": [dummy], **hyper}], **ctor)


class FreshState:
    """What the optimizer creates for a parameter on first sight, probed once per optimizer."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self._mode: Any = None  # None: not probed yet; _LAZY; "eager"; or an exception (fallback)

    def _probe(self, group: dict, like: torch.Tensor) -> Any:
        shape = (1,) * max(like.dim(), 1)
        dummy = torch.nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))
        try:
            probe = _construct_like(self.optimizer, group, dummy)
        except Exception as exc:  # any constructor may refuse; we fall back to a structural reset
            log.warning("cannot construct a second %s to learn its initial state (%s); reset zeroes the "
                        "moments and counters instead", type(self.optimizer).__name__, exc)
            return exc
        return "eager" if probe.state.get(dummy) else _LAZY

    def make(self, group: dict, param: torch.Tensor) -> Optional[dict]:
        """The first-sight state of ``param``: None for a lazily initialising optimizer (remove the
        entry), a dict of fresh tensors for an eager one; raises if no probe can be built."""
        if self._mode is None:
            self._mode = self._probe(group, param)
        if self._mode is _LAZY:
            return None
        if isinstance(self._mode, Exception):
            raise self._mode
        dummy = torch.nn.Parameter(torch.zeros_like(param))
        return dict(_construct_like(self.optimizer, group, dummy).state[dummy])


def structural_reset(state: dict, param: torch.Tensor) -> None:
    """Zero every moment and counter in place, keeping keys, types, dtypes and devices."""
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor):
            if is_counter(key) or is_moment(key, value, param):
                value.zero_()
        elif is_counter(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            state[key] = type(value)(0)


def apply_torch(optimizer: Any, trained: list, targets: set[int], policy: str, attenuation: float,
                names: Any, report: Any) -> None:
    fresh = FreshState(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    to_scale: list[torch.Tensor] = []
    for index, p in enumerate(trained):
        state = optimizer.state.get(p)  # .get: never create an entry in the defaultdict
        updated = id(p) in targets
        if state and shape_changed(state, p):
            report.shape_changed.append(names.name(p, index))
            _reset(optimizer, fresh, group_of[id(p)], p, report, names.name(p, index))
            report.reset += 1
        elif not updated:
            report.preserved += 1
        elif not state:
            report.no_state += 1
        elif policy == "preserve":
            report.preserved += 1
        elif policy == "reset":
            _reset(optimizer, fresh, group_of[id(p)], p, report, names.name(p, index))
            report.reset += 1
        else:
            to_scale.extend(v for k, v in state.items() if is_moment(k, v, p))
            report.attenuated += 1
    _scale(to_scale, attenuation)


def _reset(optimizer: Any, fresh: FreshState, group: dict, p: torch.Tensor, report: Any, name: str) -> None:
    try:
        new = fresh.make(group, p)
    except Exception:  # FreshState could not build a probe (already logged): keep the structure, zeroed
        state = optimizer.state.get(p)
        if state:
            structural_reset(state, p)
        note = f"{type(optimizer).__name__}: reset zeroed moments and counters in place (no probe)"
        if note not in report.notes:
            report.notes.append(note)
        return
    if new is None:
        optimizer.state.pop(p, None)
    else:
        optimizer.state[p] = new


def _scale(tensors: list[torch.Tensor], factor: float) -> None:
    """Multiply in place. On accelerators one fused launch per (device, dtype) group saves a kernel
    launch per tensor; on CPU a plain loop measured faster (bench/bench_opt_policy.py)."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), group in by_kind.items():
        if device.type == "cpu":
            for t in group:
                t.mul_(factor)
        else:
            torch._foreach_mul_(group, factor)
