"""KV-cache policy on weight updates: drop, keep, recompute or migrate the caches a server holds.

Serving code registers each cache it holds (a transformers ``Cache`` or per-layer ``(K, V)``
tensors) with the token ids it was computed from::

    rx = WeightReceiver("shm://policy", model=model, kv_policy="recompute")
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True)
    entry = rx.kv.register(cache, ids)      # weak reference: a finished request's cache is freed
    ...
    rx.poll()                               # a new version: the policy runs inside the same pause
    if entry.dropped: ...                   # prefill again

See :mod:`hotweights_trainer.kv.policy` for the policies and :mod:`hotweights_trainer.kv.heads` for
head maps and their formula.
"""

from .caches import is_hf_cache
from .heads import (ORDERS, HeadCounts, check_map_fits, derive_head_map, load_head_map, parse_head_map,
                    validate_head_map)
from .migrate import MigrationPlan, migrate_cache
from .policy import (POLICY_NAMES, DropPolicy, KeepPolicy, KVPolicy, MigratePolicy, RecomputePolicy,
                     attach_kv_policy, make_policy)
from .registry import KVEntry, KVReport, KVRegistry, drop_entry
from .rope import RopeSnapshot, rerotate_keys

__all__ = [
    "KVRegistry", "KVEntry", "KVReport", "KVPolicy", "DropPolicy", "KeepPolicy", "RecomputePolicy",
    "MigratePolicy", "make_policy", "attach_kv_policy", "POLICY_NAMES", "MigrationPlan", "migrate_cache",
    "RopeSnapshot", "rerotate_keys", "HeadCounts", "ORDERS", "derive_head_map", "validate_head_map",
    "parse_head_map", "load_head_map", "check_map_fits", "drop_entry", "is_hf_cache",
]
