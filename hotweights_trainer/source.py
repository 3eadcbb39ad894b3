"""Trainer-side gather: turn whatever the user passes to ``publish`` into ``(name, tensor)`` pairs.

Accepted sources: an ``nn.Module`` (its state dict: parameters and persistent buffers, tied tensors
sent once), a ``Mapping[str, Tensor]``, or any iterable of ``(name, tensor)`` pairs (which may be a
generator, e.g. one that gathers ZeRO-3 shards group by group).

A generator whose tensors stop being valid once it advances (a ZeRO-3 group is released before the
next one is gathered) yields :data:`FLUSH` after each group: the packer then closes the bucket and
copies it before asking for the next tensor.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch

from .errors import HotweightsError
from .naming import NameMap, map_name


class _Flush:
    def __repr__(self) -> str:
        return "FLUSH"


FLUSH = _Flush()
"""Yielded by a source between groups: "copy everything I yielded so far before you advance me"."""


def unwrap_model(model: Any) -> Any:
    """Peel DDP/FSDP ``.module`` and ``torch.compile``'s ``._orig_mod`` wrappers.

    A peft ``PeftModel`` is not a wrapper to peel: its tensors live under other names (and LoRA
    factors change what the weights mean); :mod:`hotweights_trainer.peft_sync` turns it into tensors.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
        ):
            model = inner
            continue
        break
    return model


def module_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, each storage sent once even when tied under two names."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else (id(t), 0, ())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        yield name, t


def iter_source(source: Any, name_map: NameMap = None, *,
                flush_marks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Normalise ``source`` into ``(wire_name, tensor)`` pairs with wrapper prefixes stripped.

    :data:`FLUSH` marks are passed on when ``flush_marks`` (the packer understands them) and dropped
    otherwise.
    """
    if isinstance(source, torch.nn.Module):
        items: Iterable = module_tensors(unwrap_model(source))
    elif isinstance(source, Mapping):
        items = source.items()
    elif isinstance(source, (str, bytes)) or not hasattr(source, "__iter__"):
        raise HotweightsError(
            f"cannot publish a {type(source).__name__}: pass an nn.Module, a Mapping[str, Tensor] "
            "or an iterable of (name, tensor)")
    else:
        items = source
    names: set[str] = set()
    for item in items:
        if item is FLUSH:
            tensor = None  # noqa: F841 - our last reference into the group being released
            if flush_marks:
                yield item
            continue
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise HotweightsError(f"source yielded {type(item).__name__}, expected (name, tensor)") from None
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise HotweightsError(
                f"source yielded ({type(name).__name__}, {type(tensor).__name__}), expected (str, Tensor)")
        wire = map_name(name, name_map)
        if wire is None:
            continue
        if wire in names:
            raise HotweightsError(f"tensor name {wire!r} appears twice in one publish")
        names.add(wire)
        yield wire, tensor.detach()
