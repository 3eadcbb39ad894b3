"""``apply_policy``: what happens to optimizer state when weights changed under it.

A resumed run's optimizer moments were computed for the weights it saved. When those weights were
replaced since (a hot swap from another trainer, a rollback to another version, a merged adapter, a
fix pushed back from a receiver), Adam's stale moments keep pushing the new weights in the old
direction. Three policies decide what the *updated* parameters' state becomes:

``preserve``
    Keep every parameter's state as it is.
``reset``
    Updated parameters get the state the optimizer would create on first sight (for lazily
    initialising optimizers such as Adam, AdamW and SGD the entry is removed and re-created by the
    next ``step()``; for eagerly initialising ones such as Adagrad it is replaced by a freshly
    constructed state). The next step of such a parameter equals a fresh optimizer's first step.
``attenuate``
    Every moment tensor of an updated parameter (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``,
    ``max_exp_avg_sq``, ...) is multiplied by ``attenuation``; ``step`` is kept. Scaling both Adam
    moments by ``a`` scales ``m / sqrt(v)`` by ``a / sqrt(a) = sqrt(a)``: ``a = 0.5`` shrinks the stale
    direction's share of the next update to about 0.71, not 0.5. SGD's momentum share scales by ``a``.

Unchanged parameters always keep their state. A parameter whose stored state no longer fits its
shape is reset under every policy, because the next step would fail on it otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch

from ..errors import ConfigError
from ..naming import strip_wrappers
from ..source import unwrap_model

log = logging.getLogger(__name__)

POLICIES = ("preserve", "reset", "attenuate")

# Wrappers around a real optimizer: Accelerate's, Accelerate's DeepSpeed shim, a DeepSpeed engine.
_OPTIMIZER_WRAPPERS = ("AcceleratedOptimizer", "DeepSpeedOptimizerWrapper", "DeepSpeedEngine")


def validate_policy(policy: Any, attenuation: Any) -> tuple[str, float]:
    """Check a policy name and an attenuation factor; raise ConfigError naming every problem."""
    problems = []
    if policy not in POLICIES:
        problems.append(f"optimizer policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if (isinstance(attenuation, bool) or not isinstance(attenuation, (int, float))
            or not math.isfinite(attenuation) or not 0.0 <= attenuation <= 1.0):
        problems.append(f"optimizer attenuation must be a number within [0, 1], got {attenuation!r}")
    if problems:
        raise ConfigError(problems)
    return policy, float(attenuation)


def effective_update_scale(policy: str, attenuation: float) -> Optional[float]:
    """Factor on the stale moments' share of the first Adam update of an updated parameter.

    ``preserve`` keeps it (1.0), ``attenuate`` scales both moments by ``a`` and so ``m / sqrt(v)`` by
    ``sqrt(a)``, ``reset`` has no stale share at all (None: the update is a fresh first step).
    """
    policy, attenuation = validate_policy(policy, attenuation)
    if policy == "preserve":
        return 1.0
    if policy == "attenuate":
        return math.sqrt(attenuation)
    return None


@dataclass
class PolicyReport:
    """What :func:`apply_policy` did, parameter by parameter, counted.

    ``preserved + attenuated + reset + no_state`` is the number of parameters the optimizer trains.
    ``unmapped`` lists entries of ``updated`` that match no parameter; ``not_in_optimizer`` lists
    updated parameters the optimizer does not train (frozen ones: no state to change).
    """

    policy: str
    attenuation: float
    backend: str = "torch"
    preserved: int = 0
    attenuated: int = 0
    reset: int = 0
    no_state: int = 0
    """Updated parameters that had no optimizer state yet, so there was nothing to change."""
    master_synced: int = 0
    """Updated parameters whose fp32 master copy (DeepSpeed) was set to the new weights."""
    updated: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    not_in_optimizer: list[str] = field(default_factory=list)
    shape_changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def effective_update_scale(self) -> Optional[float]:
        return effective_update_scale(self.policy, self.attenuation)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["effective_update_scale"] = self.effective_update_scale
        return out

    def log_entries(self) -> dict[str, float]:
        """Numbers for a trainer's logs (``hotweights/opt_*``)."""
        return {"hotweights/opt_preserved": self.preserved, "hotweights/opt_attenuated": self.attenuated,
                "hotweights/opt_reset": self.reset, "hotweights/opt_no_state": self.no_state,
                "hotweights/opt_updated": len(self.updated), "hotweights/opt_unmapped": len(self.unmapped),
                "hotweights/opt_master_synced": self.master_synced}

    def summary(self) -> str:
        text = (f"optimizer policy {self.policy}"
                + (f" (attenuation {self.attenuation:g})" if self.policy == "attenuate" else "")
                + f" on {self.backend}: {len(self.updated)} updated parameter(s); "
                f"{self.preserved} preserved, {self.attenuated} attenuated, {self.reset} reset, "
                f"{self.no_state} without state")
        if self.master_synced:
            text += f", {self.master_synced} fp32 master copies set to the new weights"
        if self.shape_changed:
            text += f"; shape changed (reset): {', '.join(self.shape_changed)}"
        if self.unmapped:
            text += f"; could not map: {', '.join(self.unmapped)}"
        if self.not_in_optimizer:
            text += f"; not trained by the optimizer: {', '.join(self.not_in_optimizer)}"
        return text


def unwrap_optimizer(optimizer: Any) -> Any:
    """Peel Accelerate's wrappers and DeepSpeed engines down to the optimizer that owns the state."""
    from .deepspeed_state import is_deepspeed_optimizer

    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if is_deepspeed_optimizer(optimizer):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if type(optimizer).__name__ in _OPTIMIZER_WRAPPERS and inner is not None:
            optimizer = inner
            continue
        break
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        raise ConfigError(
            f"apply_policy needs a torch or DeepSpeed optimizer, got {type(optimizer).__name__}")
    return optimizer


def trained_parameters(optimizer: Any) -> list[torch.nn.Parameter]:
    """Every parameter the (unwrapped) optimizer trains, each once, in param-group order."""
    from .deepspeed_state import deepspeed_parameters, is_deepspeed_optimizer

    if is_deepspeed_optimizer(optimizer):
        return deepspeed_parameters(optimizer)
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class _Names:
    """Parameter names from the model (all aliases of tied weights) and from ``param_names`` groups."""

    def __init__(self, optimizer: Any, model: Any):
        self.by_name: dict[str, torch.nn.Parameter] = {}
        self.of: dict[int, str] = {}
        if model is not None:
            for name, p in unwrap_model(model).named_parameters(remove_duplicate=False):
                name = strip_wrappers(name)
                self.by_name.setdefault(name, p)
                self.of.setdefault(id(p), name)
        for group in getattr(optimizer, "param_groups", ()):
            names = group.get("param_names") if isinstance(group, dict) else None
            if names and len(names) == len(group["params"]):
                for name, p in zip(names, group["params"]):
                    name = strip_wrappers(name)
                    self.by_name.setdefault(name, p)
                    self.of.setdefault(id(p), name)

    def name(self, p: torch.Tensor, index: Optional[int] = None) -> str:
        if id(p) in self.of:
            return self.of[id(p)]
        return f"<parameter #{index}>" if index is not None else f"<tensor {tuple(p.shape)}>"


def _resolve(updated: Iterable[Any], trained: list[torch.nn.Parameter], names: _Names,
             report: PolicyReport) -> set[int]:
    """Turn ``updated`` (names or parameters) into ids of trained parameters; record what failed."""
    if isinstance(updated, (str, bytes, torch.Tensor)) or not hasattr(updated, "__iter__"):
        raise ConfigError(
            f"updated must be a set of parameter names or parameters, got {type(updated).__name__}")
    trained_ids = {id(p): i for i, p in enumerate(trained)}
    targets: set[int] = set()
    for item in updated:
        if isinstance(item, str):
            if not names.by_name:
                raise ConfigError(
                    f"updated names parameters (e.g. {item!r}) but apply_policy has no way to resolve "
                    "names: pass model=, or build the optimizer from named_parameters()")
            p = names.by_name.get(strip_wrappers(item))
            if p is None:
                report.unmapped.append(item)
                continue
        elif isinstance(item, torch.Tensor):
            p = item
        else:
            raise ConfigError(f"updated holds a {type(item).__name__} ({item!r}); expected parameter names "
                              "or parameters")
        if id(p) not in trained_ids:
            label = item if isinstance(item, str) else names.name(p)
            (report.not_in_optimizer if id(p) in names.of or isinstance(item, str)
             else report.unmapped).append(label)
            continue
        targets.add(id(p))
    report.updated = [names.name(p, i) for i, p in enumerate(trained) if id(p) in targets]
    return targets


def apply_policy(optimizer: Any, updated: Iterable[Any], *, policy: str, attenuation: float = 1.0,
                 model: Any = None) -> PolicyReport:
    """Apply ``policy`` to the optimizer state of the ``updated`` parameters, in place.

    ``optimizer`` is a ``torch.optim`` optimizer (Adam, AdamW, SGD with momentum, or any optimizer
    whose per-parameter state holds tensors shaped like the parameter), an Accelerate-wrapped one, or
    a DeepSpeed ZeRO optimizer / engine (ZeRO-1/2, bf16, ZeRO-3; see ``deepspeed_state``).
    ``updated`` is a set of parameter names or parameters; names are resolved through ``model`` (all
    names of tied weights, wrapper prefixes stripped) or the optimizer's ``param_names``.

    * Unchanged parameters keep their state under every policy.
    * ``preserve`` keeps every state; ``reset`` gives updated parameters first-sight state, so their
      next step equals a fresh optimizer's first step; ``attenuate`` multiplies every moment tensor
      of updated parameters by ``attenuation`` and keeps ``step``.
    * A parameter whose state no longer fits its shape is reset, whatever the policy.
    * On DeepSpeed, the fp32 master copy of every updated parameter is also set to its current
      weights, so the next step moves from the new weights instead of overwriting them.

    Raises ConfigError for an unknown policy or an attenuation outside [0, 1] (nothing changed).
    """
    policy, attenuation = validate_policy(policy, attenuation)
    inner = unwrap_optimizer(optimizer)
    from .deepspeed_state import apply_deepspeed, is_deepspeed_optimizer
    from .torch_state import apply_torch

    trained = trained_parameters(inner)
    names = _Names(inner, model)
    report = PolicyReport(policy=policy, attenuation=attenuation)
    targets = _resolve(updated, trained, names, report)
    with torch.no_grad():
        if is_deepspeed_optimizer(inner):
            apply_deepspeed(inner, trained, targets, policy, attenuation, names, report)
        else:
            apply_torch(inner, trained, targets, policy, attenuation, names, report)
    log.info("%s", report.summary())
    for note in report.notes:
        log.warning("optimizer policy: %s", note)
    return report
