"""What happens to registered KV caches when a receiver applies a new version.

- ``drop`` (default): every cache is invalidated (``entry.dropped``; transformers caches are reset,
  freeing their memory). Exact; costs a fresh prefill.
- ``keep``: caches stay as they are, computed under older weights (``entry.stale``). Cheap, not
  exact; explicit opt-in, logged once per version.
- ``recompute``: the prefill of each cached prefix is run again with the new weights. Exact.
- ``migrate``: layout transforms only (KV dtype, RoPE re-rotation, head order), and only with
  ``kv_allow_transforms``. The cached values are kept, so the result is exact when the new version
  differs from the old in layout alone (a cast, a RoPE change, permuted heads); otherwise it is as
  stale as ``keep``.

A cache that a policy cannot bring to the new version (too few token ids for a recompute, a map
that does not fit it, an unsupported layer type) is dropped, and ``entry.reason`` says why.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch

from ..config import SyncConfig
from ..errors import ConfigError, KVMigrationError
from .heads import check_map_fits, derive_head_map, load_head_map
from .migrate import MigrationPlan, apply_plan
from .recompute import recompute
from .registry import KVEntry, KVRegistry, drop_entry

log = logging.getLogger(__name__)

POLICY_NAMES = ("drop", "keep", "recompute", "migrate")


class KVPolicy:
    name = "?"

    def begin(self, registry: KVRegistry, entries: list[KVEntry], version: int) -> None:
        """Called once per applied version, before the entries."""

    def apply_entry(self, registry: KVRegistry, entry: KVEntry, version: int) -> list[str]:
        """Bring one entry to ``version``; returns the transforms applied. May raise: the entry is dropped."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DropPolicy(KVPolicy):
    name = "drop"

    def apply_entry(self, registry: KVRegistry, entry: KVEntry, version: int) -> list[str]:
        drop_entry(entry, f"dropped at version {version} (kv_policy=drop)")
        return []


class KeepPolicy(KVPolicy):
    name = "keep"

    def begin(self, registry: KVRegistry, entries: list[KVEntry], version: int) -> None:
        if entries:
            log.info("kv_policy=keep: %d KV cache(s) computed under older weights stay in use at version %d "
                     "(stale, not exact)", len(entries), version)

    def apply_entry(self, registry: KVRegistry, entry: KVEntry, version: int) -> list[str]:
        if entry.version != version:
            entry.state = "kept"
        return []


class RecomputePolicy(KVPolicy):
    name = "recompute"

    def apply_entry(self, registry: KVRegistry, entry: KVEntry, version: int) -> list[str]:
        if registry.model is None:
            raise KVMigrationError("kv_policy=recompute needs the model that computes the caches")
        recompute(entry.ref, entry.token_ids, registry.model, head_order=entry.head_order,
                  counts=registry.head_counts)
        entry.state, entry.version = "fresh", version
        entry.rope = registry.current_rope()
        if entry.ref.kind == "hf":
            entry.head_order = registry.head_order  # the engine wrote it in its own order
        return ["recompute"]


class MigratePolicy(KVPolicy):
    """Transform caches to the new version's layout.

    ``kv_dtype``: dtype the new version's caches hold (default: the model's dtype; without a model,
    unchanged). ``head_map``: explicit permutation for caches registered in the other head order
    (default: the map derived from the head counts). ``head_order``: the engine's order (default:
    the registry's).
    """

    name = "migrate"

    def __init__(self, *, kv_dtype: Optional[Union[torch.dtype, str]] = None,
                 head_map: Optional[list[int]] = None, head_order: Optional[str] = None):
        if isinstance(kv_dtype, str):
            dt = getattr(torch, kv_dtype, None)
            if not isinstance(dt, torch.dtype):
                raise ConfigError(f"kv_dtype {kv_dtype!r} is not a torch dtype")
            kv_dtype = dt
        self.kv_dtype = kv_dtype
        self.head_map = head_map
        self.head_order = head_order

    def target_dtype(self, registry: KVRegistry) -> Optional[torch.dtype]:
        if self.kv_dtype is not None:
            return self.kv_dtype
        model_dtype = getattr(registry.model, "dtype", None)
        return model_dtype if isinstance(model_dtype, torch.dtype) else None

    def target_order(self, registry: KVRegistry) -> str:
        return self.head_order if self.head_order is not None else registry.head_order

    def head_map_for(self, registry: KVRegistry, entry: KVEntry) -> Optional[list[int]]:
        target = self.target_order(registry)
        if entry.head_order == target:
            return None
        if self.head_map is not None:
            return self.head_map
        counts = registry.head_counts
        if counts is None:
            raise KVMigrationError(f"the cache is in {entry.head_order} order but the engine uses {target}: "
                                   "deriving the map needs the head counts (model config or head_counts=)")
        first = next((kv for kv in entry.ref.pairs() if kv is not None), None)
        if first is None:
            return None
        stored = first[0].shape[entry.ref.head_axis]
        if counts.layout_of(stored) == "compact":
            return None  # each KV head is stored once: the order lives in the weights only
        return derive_head_map(counts, target)

    def apply_entry(self, registry: KVRegistry, entry: KVEntry, version: int) -> list[str]:
        rope_to = registry.current_rope()
        plan = MigrationPlan(dtype=self.target_dtype(registry), head_map=self.head_map_for(registry, entry),
                             rope_from=entry.rope, rope_to=rope_to)
        done = apply_plan(entry.ref, plan)
        entry.state, entry.version = "migrated", version
        entry.rope = rope_to if rope_to is not None else entry.rope
        entry.head_order = self.target_order(registry)
        if done:
            log.debug("migrated a KV cache to version %d: %s", version, ", ".join(done))
        return done

    def __repr__(self) -> str:
        return f"MigratePolicy(kv_dtype={self.kv_dtype}, head_map={self.head_map}, head_order={self.head_order})"


def make_policy(spec: Union[str, KVPolicy, None], config: SyncConfig, registry: KVRegistry) -> KVPolicy:
    """A policy from a name (``config.kv_policy`` when None) or an instance; checks it against ``registry``.

    Raises ConfigError for an unknown name, ``recompute`` without a model or ``migrate`` without
    ``kv_allow_transforms``; KVMigrationError for an invalid head map.
    """
    name: Any = config.kv_policy if spec is None else spec
    if isinstance(name, KVPolicy):
        policy = name
    elif name == "drop":
        policy = DropPolicy()
    elif name == "keep":
        policy = KeepPolicy()
    elif name == "recompute":
        policy = RecomputePolicy()
    elif name == "migrate":
        policy = MigratePolicy(head_map=load_head_map(config.kv_head_map, config.kv_head_map_file),
                               head_order=config.kv_head_order)
    else:
        raise ConfigError(f"kv_policy must be one of {', '.join(POLICY_NAMES)} or a KVPolicy, got {name!r}")
    if isinstance(policy, RecomputePolicy) and registry.model is None:
        raise ConfigError("kv_policy=recompute needs a model to prefill with (WeightReceiver(model=...) "
                          "or kv_registry=KVRegistry(model))")
    if isinstance(policy, MigratePolicy):
        if not config.kv_allow_transforms:
            raise ConfigError("kv_policy=migrate transforms caches and needs kv_allow_transforms "
                              "(HOTWEIGHTS_KV_ALLOW_TRANSFORMS=1)")
        if policy.head_map is not None and registry.head_counts is not None:
            check_map_fits(policy.head_map, registry.head_counts)
    return policy


def attach_kv_policy(receiver: Any, policy: Union[str, KVPolicy, None] = None,
                     registry: Optional[KVRegistry] = None) -> KVRegistry:
    """Give ``receiver`` a KV registry whose policy runs inside every apply pause; returns the registry."""
    config: SyncConfig = receiver.config
    if registry is None:
        registry = KVRegistry(receiver.model, head_order=config.kv_head_order)
    chosen = make_policy(policy, config, registry)
    registry.policy = chosen
    registry.version = receiver.version

    def on_apply(rx: Any, version: int) -> None:
        registry.apply(chosen, version)

    receiver.add_apply_hook(on_apply)
    return registry


__all__ = ["KVPolicy", "DropPolicy", "KeepPolicy", "RecomputePolicy", "MigratePolicy", "make_policy",
           "attach_kv_policy", "POLICY_NAMES"]
