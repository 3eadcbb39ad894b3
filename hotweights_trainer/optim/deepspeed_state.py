"""Policies on DeepSpeed's partitioned optimizer state, through DeepSpeed's own accessors.

DeepSpeed keeps, per parameter group, one flat fp32 *master* partition per rank and the base
optimizer's moments for that partition. Each model parameter owns a fragment of those flats on some
ranks. Two things follow:

* Weights swapped into the model's (low-precision or fp32) parameters are not seen by the master copy;
  the next step would compute from the stale master and overwrite the swap. So every updated
  parameter's master fragment is set to the current weights (``safe_set_full_fp32_param`` on
  ZeRO-1/2 and bf16, ``safe_set_local_fp32_param`` on ZeRO-3), whatever the policy.
* Moments are changed fragment by fragment: ``reset`` writes zeros with
  ``safe_set_full_optimizer_state`` (ZeRO-1/2) / ``safe_set_local_optimizer_state`` (ZeRO-3);
  ``attenuate`` scales each rank's own fragment in place. Every operation is local to the rank: no
  collective is issued, so ranks can never wait on each other here.

The base optimizer keeps one ``step`` counter per flat group, shared by all its parameters. ``reset``
sets it to 0 when every parameter of a group is updated, which makes the next step a fresh first
step. When only some are, the counter (and with it Adam's bias correction) must stay for the others;
the moments of the updated parameters are still zeroed, and the report says so in ``notes``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..errors import OptimizerPolicyError, missing_dependency

log = logging.getLogger(__name__)

# (attribute with the lists of model parameters per group, attribute with the flat fp32 partitions)
_LAYOUTS = {
    "zero12": ("bit16_groups", "single_partition_of_fp32_groups"),
    "bf16": ("bf16_groups", "fp32_groups_flat_partition"),
    "zero3": ("fp16_groups", "fp32_partitioned_groups_flat"),
}


def layout(optimizer: Any) -> Optional[str]:
    if not type(optimizer).__module__.startswith("deepspeed"):
        return None
    for name, (groups_attr, flat_attr) in _LAYOUTS.items():
        if all(hasattr(optimizer, a) for a in (groups_attr, flat_attr, "optimizer")):
            return name
    return None


def is_deepspeed_optimizer(optimizer: Any) -> bool:
    return layout(optimizer) is not None


def _groups(optimizer: Any) -> tuple[list[list[torch.nn.Parameter]], list[torch.Tensor]]:
    groups_attr, flat_attr = _LAYOUTS[layout(optimizer)]
    return getattr(optimizer, groups_attr), getattr(optimizer, flat_attr)


def deepspeed_parameters(optimizer: Any) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for group in _groups(optimizer)[0]:
        for p in group:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _ds_utils():
    try:
        from deepspeed import utils
    except ImportError as exc:  # pragma: no cover - a DeepSpeed optimizer implies deepspeed is importable
        raise missing_dependency("deepspeed", "deepspeed") from exc
    return utils


def _state_keys(base_state: dict, flat: torch.Tensor) -> list[str]:
    """Moment keys of one flat partition: tensors shaped like it (``step`` never is)."""
    return sorted(k for k, v in base_state.get(flat, {}).items()
                  if isinstance(v, torch.Tensor) and v.shape == flat.shape and v.is_floating_point())


class _Zero12:
    """ZeRO-1/2 and bf16: a parameter's fragment is ``param._hp_mapping`` (None on ranks that own none)."""

    def __init__(self, optimizer: Any):
        self.opt = optimizer
        self.groups, self.flats = _groups(optimizer)
        self.utils = _ds_utils()

    def group_index(self, p: torch.nn.Parameter) -> Optional[int]:
        for i, group in enumerate(self.groups):
            if any(q is p for q in group):
                return i
        return None

    def _mapping(self, p: torch.nn.Parameter) -> Any:
        hp = getattr(p, "_hp_mapping", None)
        if hp is not None and hp.optim_fragment is None:
            # DeepSpeed links optimizer-state fragments lazily, at the first step after init or a
            # checkpoint load; link them now the way it does, so they are reachable before that step.
            hp.set_optim_state_fragment(self.flats[hp.param_group_index],
                                        self.opt.optimizer.state.get(self.flats[hp.param_group_index], {}))
        return hp

    def has_state(self, p: torch.nn.Parameter) -> bool:
        i = self.group_index(p)
        return i is not None and bool(_state_keys(self.opt.optimizer.state, self.flats[i]))

    def reset(self, p: torch.nn.Parameter) -> None:
        hp = self._mapping(p)
        if hp is None:
            return
        for key in hp.get_optim_state_keys():
            self.utils.safe_set_full_optimizer_state(p, torch.zeros(p.shape, dtype=torch.float32), key)

    def attenuate(self, p: torch.nn.Parameter, factor: float) -> None:
        hp = self._mapping(p)
        if hp is None:
            return
        for key in hp.get_optim_state_keys():
            # The local equivalent of get/set_full_optimizer_state: only this rank's fragment, no all-reduce.
            hp.get_hp_fragment(key).mul_(factor)

    def sync_master(self, p: torch.nn.Parameter) -> None:
        if getattr(p, "_hp_mapping", None) is not None:
            self.utils.safe_set_full_fp32_param(p, p.detach())


class _Zero3:
    """ZeRO-3: each rank holds ``param.ds_tensor`` and the matching fp32 and moment partitions."""

    def __init__(self, optimizer: Any):
        self.opt = optimizer
        self.groups, self.flats = _groups(optimizer)
        self.utils = _ds_utils()

    def group_index(self, p: torch.nn.Parameter) -> Optional[int]:
        pos = self.opt.grad_position.get(self.opt.get_param_id(p)) if p.requires_grad else None
        return None if pos is None else pos[0]

    def has_state(self, p: torch.nn.Parameter) -> bool:
        i = self.group_index(p)
        return i is not None and bool(_state_keys(self.opt.optimizer.state, self.flats[i]))

    def _keys(self, p: torch.nn.Parameter) -> list[str]:
        i = self.group_index(p)
        return [] if i is None else _state_keys(self.opt.optimizer.state, self.flats[i])

    def reset(self, p: torch.nn.Parameter) -> None:
        for key in self._keys(p):
            local = self.utils.safe_get_local_optimizer_state(p, key)
            self.utils.safe_set_local_optimizer_state(p, torch.zeros_like(local), key)

    def attenuate(self, p: torch.nn.Parameter, factor: float) -> None:
        for key in self._keys(p):
            local = self.utils.safe_get_local_optimizer_state(p, key)
            self.utils.safe_set_local_optimizer_state(p, local * factor, key)

    def sync_master(self, p: torch.nn.Parameter) -> None:
        if self.group_index(p) is not None:
            local = p.ds_tensor.detach().reshape(-1)
            master = self.utils.safe_get_local_fp32_param(p)
            self.utils.safe_set_local_fp32_param(p, local[: master.numel()].to(master.dtype))


def apply_deepspeed(optimizer: Any, trained: list, targets: set[int], policy: str, attenuation: float,
                    names: Any, report: Any) -> None:
    kind = layout(optimizer)
    access = _Zero3(optimizer) if kind == "zero3" else _Zero12(optimizer)
    report.backend = f"deepspeed-{kind}"
    try:
        for index, p in enumerate(trained):
            if id(p) not in targets:
                report.preserved += 1
                continue
            access.sync_master(p)
            report.master_synced += 1
            if not access.has_state(p):
                report.no_state += 1
            elif policy == "preserve":
                report.preserved += 1
            elif policy == "reset":
                access.reset(p)
                report.reset += 1
            else:
                access.attenuate(p, attenuation)
                report.attenuated += 1
        if policy == "reset":
            _reset_step_counters(optimizer, access, targets, report)
    except (AttributeError, KeyError, ValueError, AssertionError) as exc:
        # DeepSpeed's internal layout differs from the one this code knows (another version): say so.
        raise OptimizerPolicyError(
            f"cannot apply the {policy} policy to {type(optimizer).__name__} ({kind}): {exc!r}") from exc


def _reset_step_counters(optimizer: Any, access: Any, targets: set[int], report: Any) -> None:
    base_state = optimizer.optimizer.state
    for i, (group, flat) in enumerate(zip(access.groups, access.flats)):
        trained = [p for p in group if p.requires_grad]
        hit = sum(id(p) in targets for p in trained)
        state = base_state.get(flat)
        if not hit or not state or "step" not in state:
            continue
        if hit == len(trained):
            step = state["step"]
            if isinstance(step, torch.Tensor):
                step.zero_()
            else:
                state["step"] = type(step)(0)
        else:
            step = state["step"]
            value = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
            report.notes.append(
                f"group {i}: {hit} of {len(trained)} parameters reset; the group's shared step counter "
                f"stays at {value} for the others, so the reset ones' next update uses that bias correction "
                "instead of a first step's")
