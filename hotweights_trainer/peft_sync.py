"""PEFT (LoRA) models as a publish source, and the receiver's check of a version's PEFT form.

A model wrapped by ``peft.get_peft_model`` names its tensors differently from the base model
(``base_model.model.<name>``, ``<layer>.base_layer.weight``, ``<layer>.lora_A.<adapter>.weight``,
``<module>.modules_to_save.<adapter>.weight``), so sending it as it is fits no plain receiver.
``SyncConfig.peft_mode`` chooses what travels instead:

``merged`` (default)
    Every tensor under the base model's name, as ``merge_and_unload()`` would leave it: a LoRA
    layer's weight is ``W + scaling * (B @ A)`` for each adapter a merge would merge (the active
    ones not merged yet), a ``modules_to_save`` module is its trained copy. The value is computed
    into a new tensor with peft's own ``get_delta_weight`` and added the way peft's merge adds it
    (in place into a clone, same dtype rules per layer type), so it equals ``merge_and_unload()``
    bit for bit and the trainer's weights are never written. (Merging into the trainer's weights and
    unmerging afterwards is not exact in bf16: frozen weights would drift with every push.) Layers
    whose merge is not that plain add -- LoRA variants such as DoRA, quantized or non-LoRA tuner
    layers -- are refused up front with :class:`UnsupportedAdapterError`, all of them in one error.
``adapter``
    Only what training changes: every tensor under a tuner layer except its base layer, the
    ``modules_to_save`` copies (not the originals), and any other tensor that requires grad (e.g.
    biases trained with ``LoraConfig.bias``), under the PeftModel's own names. The receiver holds
    the same PeftModel (same adapter names) and copies them into it in place.

The publisher names the form in ``begin`` (``"peft": mode``). A receiver whose model does not fit
refuses the version with :class:`PeftModeError` before staging anything (:func:`receiver_problem`).

Under DeepSpeed ZeRO-3, :meth:`PeftView.unit_of` keeps a LoRA layer's base weight and its adapter
factors in one gather group (the merge reads both), and :meth:`PeftView.makes_copy` says which
entries become a new tensor, so the group sizing counts that copy too (see integrations/gather.py).

peft is imported only when it is loaded already: a model can hold PEFT layers only after the peft
package was imported, so plain models never pay for the import.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Optional

import torch

from .errors import ConfigError, PeftModeError, UnsupportedAdapterError, missing_dependency
from .source import FLUSH, module_tensors, unwrap_model

log = logging.getLogger(__name__)

MODES = ("merged", "adapter")
_BASE_SEGMENTS = frozenset(("base_layer", "original_module"))
"""Path segments under a tuner layer that hold the frozen base module, not adapter state."""


def peft_loaded() -> bool:
    """Whether the peft package was imported in this process (else no module can hold its layers)."""
    return sys.modules.get("peft") is not None


@functools.lru_cache(maxsize=None)
def _peft() -> Any:
    """peft's classes this module needs; a missing peft gives the install command."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError as exc:
        raise missing_dependency("peft", "peft") from exc
    return SimpleNamespace(
        PeftModel=PeftModel, BaseTuner=BaseTuner, BaseTunerLayer=BaseTunerLayer,
        Aux=AuxiliaryTrainingWrapper, MTS=ModulesToSaveWrapper,
        # Layer types whose merge is exactly "weight += delta" (Embedding: "+= delta.to(dtype)").
        MERGE_ADD=(lora_layer.Linear, lora_layer.Conv1d, lora_layer.Conv2d, lora_layer.Conv3d),
        MERGE_ADD_CAST=(lora_layer.Embedding,))


def tuner_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The outermost PEFT layers and wrappers of ``module``, by their state-dict prefix."""
    if not peft_loaded():
        return {}
    p = _peft()
    found: dict[str, torch.nn.Module] = {}
    for name, m in module.named_modules():
        if isinstance(m, (p.BaseTunerLayer, p.Aux)) and _enclosing(name, found) is None:
            found[name] = m
    return found


def has_peft_layers(module: Any) -> bool:
    module = unwrap_model(module)
    return isinstance(module, torch.nn.Module) and bool(tuner_layers(module))


def _enclosing(name: str, layers: dict[str, Any]) -> Optional[str]:
    """The prefix in ``layers`` that ``name`` lies under (a strict ancestor path), or None."""
    prefix = name
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in layers:
            return prefix
    return None


def _base_prefix(module: torch.nn.Module, p: Any) -> str:
    """Where the base model sits in ``module``'s names ("base_model.model." for a PeftModel)."""
    if isinstance(module, p.PeftModel):
        inner = module.get_base_model()
    elif isinstance(module, p.BaseTuner):
        inner = module.model
    else:
        return ""
    for name, m in module.named_modules():
        if m is inner:
            return name + "." if name else ""
    return ""


@dataclass(frozen=True)
class Route:
    """How one state-dict entry of a PEFT model travels in one mode."""

    wire: Optional[str]
    """Name it is sent under; None when it does not travel."""
    needed: bool
    """Must hold its full data while its unit is produced (ZeRO-3 gathers only these)."""
    unit: str
    """Entries of one unit are gathered together (a LoRA layer: the merge reads base and factors)."""
    merge: Optional[str] = None
    """"weight" or "bias": the value is computed from the layer's adapters (merged mode)."""
    layer: Any = None
    adapters: tuple[str, ...] = ()


class PeftView:
    """The tensors of a PEFT model in one mode (``merged`` or ``adapter``); see the module docstring."""

    def __init__(self, module: torch.nn.Module, mode: str):
        if mode not in MODES:
            raise ConfigError(f"peft_mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._p = _peft()
        self.mode = mode
        self.layers = tuner_layers(module)
        self._strip = _base_prefix(module, self._p) if mode == "merged" else ""
        self._routes: dict[str, Route] = {}
        if mode == "merged":
            problems = [f"{name}: {why}" for name, layer in self.layers.items()
                        if (why := self._merge_problem(layer)) is not None]
            if problems:
                raise UnsupportedAdapterError(problems)

    # ---------------------------------------------------------------- merged mode: what can be merged
    def _merge_adapters(self, layer: Any) -> tuple[str, ...]:
        """What ``merge_and_unload()`` merges into this layer: active adapters not merged yet."""
        factors = layer.lora_embedding_A if isinstance(layer, self._p.MERGE_ADD_CAST) else layer.lora_A
        merged = set(layer.merged_adapters) if layer.merged else set()
        return tuple(a for a in layer.active_adapters if a in factors and a not in merged)

    def _merge_problem(self, layer: Any) -> Optional[str]:
        p = self._p
        hint = "; send it with peft_mode=adapter to a receiver holding the PeftModel"
        if isinstance(layer, p.MTS):
            if layer.active_adapters and hasattr(layer.modules_to_save[layer.active_adapters[0]], "base_layer"):
                return f"a modules_to_save copy that holds a tuner layer cannot be merged here{hint}"
            return None
        if type(layer) not in p.MERGE_ADD + p.MERGE_ADD_CAST:
            return (f"{type(layer).__module__}.{type(layer).__name__} is not a plain LoRA layer "
                    f"(Linear, Embedding, Conv1d/2d/3d); merged sync cannot reproduce its merge{hint}")
        if isinstance(layer.base_layer, p.BaseTunerLayer):
            return f"nested tuner layers are not supported by merged sync{hint}"
        variants = sorted({type(layer.lora_variant[a]).__name__ for a in self._merge_adapters(layer)
                           if a in layer.lora_variant})
        if variants:
            return (f"LoRA variant {', '.join(variants)} (e.g. DoRA, use_dora=True) merges by its own rule; "
                    f"merged sync supports plain LoRA only{hint}")
        return None

    # ---------------------------------------------------------------- routing
    def route(self, name: str, tensor: torch.Tensor) -> Route:
        hit = self._routes.get(name)
        if hit is None:
            hit = self._routes[name] = self._route(name, tensor)
        return hit

    def _route(self, name: str, tensor: torch.Tensor) -> Route:
        prefix = _enclosing(name, self.layers)
        if prefix is None:  # a tensor no tuner touches
            if self.mode == "adapter":
                trains = bool(tensor.requires_grad)
                return Route(name if trains else None, trains, name)
            return Route(self._base_name(name), True, name)
        layer, rest = self.layers[prefix], name[len(prefix) + 1:]
        if self.mode == "adapter":
            base = bool(_BASE_SEGMENTS.intersection(rest.split(".")))
            return Route(None if base else name, not base, prefix)
        if isinstance(layer, self._p.MTS):
            chosen = (f"modules_to_save.{layer.active_adapters[0]}." if layer.active_adapters
                      else "original_module.")  # what merge_and_unload() keeps
            if rest.startswith(chosen):
                return Route(self._base_name(f"{prefix}.{rest[len(chosen):]}"), True, prefix)
            return Route(None, False, prefix)
        adapters = self._merge_adapters(layer)
        if rest.startswith("base_layer."):
            leaf = rest[len("base_layer."):]
            wire = self._base_name(f"{prefix}.{leaf}")
            if leaf == "weight" and adapters:
                return Route(wire, True, prefix, "weight", layer, adapters)
            if leaf == "bias" and any(layer.lora_bias.get(a) for a in adapters):
                return Route(wire, True, prefix, "bias", layer, adapters)
            return Route(wire, True, prefix)
        # An adapter factor ("lora_A.<adapter>.weight", "lora_embedding_B.<adapter>"): read by the merge
        # of its layer when that adapter is merged, never sent.
        parts = rest.split(".")
        return Route(None, len(parts) > 1 and parts[1] in adapters, prefix)

    def _base_name(self, name: str) -> str:
        return name[len(self._strip):] if self._strip and name.startswith(self._strip) else name

    def unit_of(self, name: str, tensor: torch.Tensor) -> str:
        return self.route(name, tensor).unit

    def needed(self, name: str, tensor: torch.Tensor) -> bool:
        return self.route(name, tensor).needed

    def makes_copy(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether this entry is sent as a newly computed tensor of its own size (a merged weight)."""
        return self.route(name, tensor).merge is not None

    # ---------------------------------------------------------------- the items
    def items(self, pairs: Iterable[Any]) -> Iterator[Any]:
        """``(wire name, tensor)`` for what travels, from the model's state-dict pairs; FLUSH passes."""
        for item in pairs:
            if item is FLUSH:
                yield item
                continue
            name, tensor = item
            r = self.route(name, tensor)
            if r.wire is None:
                continue
            if r.merge == "weight":
                yield r.wire, self._merged_weight(r, tensor)
            elif r.merge == "bias":
                yield r.wire, _merged_bias(r, tensor)
            else:
                yield r.wire, tensor

    def _merged_weight(self, r: Route, weight: torch.Tensor) -> torch.Tensor:
        # peft's merge: Linear/Conv do ``weight.data += delta`` (an in-place add that rounds once into
        # the weight dtype), Embedding does ``weight.data += delta.to(dtype)``; the same ops on a clone.
        # Run with torch's thread settings as they are: one intra-op thread would dodge the pool's
        # stalls on busy cores, but changes the reduction order of a Conv delta, so the result would no
        # longer equal a merge_and_unload() run under the caller's settings.
        cast = isinstance(r.layer, self._p.MERGE_ADD_CAST)
        with torch.no_grad():
            out = weight.detach().clone()
            for adapter in r.adapters:
                delta = r.layer.get_delta_weight(adapter)
                out += delta.to(out.dtype) if cast else delta
        return out


def _merged_bias(r: Route, bias: torch.Tensor) -> torch.Tensor:
    # peft: ``bias.data += lora_B[adapter].bias * scaling[adapter]`` for adapters with lora_bias.
    with torch.no_grad():
        out = bias.detach().clone()
        for adapter in r.adapters:
            if r.layer.lora_bias.get(adapter):
                out += r.layer.lora_B[adapter].bias * r.layer.scaling[adapter]
    return out


def view_of(module: Any, mode: str) -> Optional[PeftView]:
    """A :class:`PeftView` of ``module`` when it holds PEFT layers, else None."""
    module = unwrap_model(module)
    if not isinstance(module, torch.nn.Module) or not peft_loaded() or not tuner_layers(module):
        return None
    view = PeftView(module, mode)
    log.debug("PEFT model with %d tuner layers: sending it %s", len(view.layers), mode)
    return view


class PeftItems(list):
    """``(name, tensor)`` pairs already in one PEFT form (an async snapshot); ``peft_mode`` says which."""

    def __init__(self, items: Iterable[Any], peft_mode: Optional[str]):
        super().__init__(items)
        self.peft_mode = peft_mode


def prepare(source: Any, mode: str) -> tuple[Optional[str], Any]:
    """The PEFT form of ``source`` and what to iterate instead of it.

    A module holding PEFT layers becomes its ``mode`` items (validated now, before anything is sent);
    a source already in a form (a ZeRO-3 ``ShardedSource`` or :class:`PeftItems`) carries it in
    ``peft_mode``; anything else is returned unchanged with form None.
    """
    if isinstance(source, torch.nn.Module):
        module = unwrap_model(source)
        view = view_of(module, mode)
        if view is None:
            return None, source
        return mode, view.items(module_tensors(module))
    form = getattr(source, "peft_mode", None)
    return (form if form in MODES else None), source


# -------------------------------------------------------------------------------------- receiver side
def adapter_targets(model: torch.nn.Module, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``targets`` (a PEFT model's state dict) that its adapter form carries."""
    view = PeftView(unwrap_model(model), "adapter")
    return {name: t for name, t in targets.items() if view.route(name, t).wire is not None}


def receiver_problem(form: Any, model: Optional[torch.nn.Module], holds_peft: bool) -> Optional[PeftModeError]:
    """Why a receiver cannot take a version announced in PEFT ``form`` (None when it can).

    ``model`` is None for a receiver that applies through a callable only: adapter tensors would
    reach it under PeftModel names it has no way to place, so such versions are refused too.
    """
    if form is None or (form == "merged" and not holds_peft):
        return None
    if form == "adapter" and holds_peft:
        return None
    if form == "adapter":
        held = "an apply callable only" if model is None else f"a plain {type(unwrap_model(model)).__name__}"
        return PeftModeError(
            f"adapter-mode version sent to a receiver without a PeftModel (it holds {held}): adapter tensors "
            "fit only the same PeftModel. Give this receiver the PeftModel, or publish with peft_mode=merged "
            "(HOTWEIGHTS_PEFT_MODE=merged) to send merged weights under the base model's names")
    if form == "merged":
        return PeftModeError(
            "merged-mode version (base model names, adapters folded in) sent to a receiver holding a "
            "PeftModel: applying it would leave the receiver's adapters on top of merged weights. Give this "
            "receiver the plain base model, or publish with peft_mode=adapter (HOTWEIGHTS_PEFT_MODE=adapter)")
    return PeftModeError(f"version announced an unknown PEFT form {form!r} (expected one of {', '.join(MODES)})")


__all__ = ["MODES", "PeftItems", "PeftView", "Route", "adapter_targets", "has_peft_layers", "peft_loaded",
           "prepare", "receiver_problem", "tuner_layers", "view_of"]
