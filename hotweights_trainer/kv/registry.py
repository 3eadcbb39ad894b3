"""The registry of KV caches a serving process holds, and the entry serving code keeps for each.

Serving code registers each cache together with the token ids it was computed from and keeps the
returned :class:`KVEntry`. When the receiver applies a version, the policy runs over every live
entry inside the same pause; the entry then tells the serving code what happened (``dropped``,
``stale``, ``state``). The registry holds caches only through weak references: a finished request's
cache is collected as usual and silently leaves the registry.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch

from ..errors import KVCacheError, KVMigrationError
from .caches import CacheRef, make_ref
from .heads import ORDERS, HeadCounts
from .rope import RopeSnapshot, find_rotary_modules

if TYPE_CHECKING:
    from .policy import KVPolicy

log = logging.getLogger(__name__)

State = Literal["fresh", "kept", "migrated", "dropped"]


def as_token_tensor(token_ids: Any) -> torch.Tensor:
    """Token ids as a CPU int64 tensor of shape [batch, length]."""
    if isinstance(token_ids, torch.Tensor):
        t = token_ids.detach().to("cpu", torch.long)
    else:
        try:
            t = torch.tensor(token_ids, dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise KVCacheError(f"token ids must be a tensor or (nested) list of ints of equal length: {exc}") from None
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise KVCacheError(f"token ids must have shape [length] or [batch, length], got {tuple(t.shape)}")
    return t.clone()


class KVEntry:
    """What serving code keeps for one registered cache.

    ``state``: ``fresh`` (computed under the live weights: just registered or recomputed),
    ``kept`` (policy keep: still the values of an older version, ``stale`` is True), ``migrated``
    (transformed to the new version's layout; exact only when the new version differs from the old
    in layout alone), ``dropped`` (invalid: prefill again; HF caches are also reset).
    """

    def __init__(self, ref: CacheRef, token_ids: torch.Tensor, version: int, rope: Optional[RopeSnapshot],
                 head_order: str):
        self.ref = ref
        self.token_ids = token_ids
        self.version = version
        """Weights version the cache corresponds to (unchanged by ``keep``)."""
        self.rope = rope
        self.head_order = head_order
        self.state: State = "fresh"
        self.reason: Optional[str] = None
        """Why the entry was dropped when a policy could not bring it to the new version."""

    @property
    def cache(self) -> Any:
        """The registered cache, or None once it was collected."""
        return self.ref.get()

    @property
    def dropped(self) -> bool:
        return self.state == "dropped"

    @property
    def stale(self) -> bool:
        """True when the cache still holds the values of an older version (policy keep)."""
        return self.state == "kept"

    def extend(self, token_ids: Any) -> None:
        """Append tokens the serving code fed into the cache (or is about to)."""
        more = as_token_tensor(token_ids)
        if more.shape[0] != self.token_ids.shape[0]:
            raise KVCacheError(f"extend: batch {more.shape[0]} does not match the entry's batch "
                               f"{self.token_ids.shape[0]}")
        self.token_ids = torch.cat([self.token_ids, more], dim=1)

    def set_tokens(self, token_ids: Any) -> None:
        self.token_ids = as_token_tensor(token_ids)

    def __repr__(self) -> str:
        return (f"KVEntry(state={self.state}, version={self.version}, kind={self.ref.kind}, "
                f"tokens={tuple(self.token_ids.shape)})")


@dataclass
class KVReport:
    """What one policy run did."""

    version: int
    policy: str
    states: dict[str, int] = field(default_factory=dict)
    transforms: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


class KVRegistry:
    """The caches one serving process holds, for one model.

    ``model``: the ``nn.Module`` that computes the caches (used by ``recompute``, for head counts and
    for the rotary state). ``rotary``: the rotary module to snapshot when the model has several or an
    unusual one. ``head_counts``: (H, KvH) when there is no model config to read them from.
    ``head_order``: the serving engine's order of expanded caches (default: the config's).
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, *, rotary: Optional[torch.nn.Module] = None,
                 head_counts: Optional[tuple[int, int] | HeadCounts] = None, head_order: str = "grouped"):
        if head_order not in ORDERS:
            raise KVMigrationError(f"head order must be one of {', '.join(ORDERS)}, got {head_order!r}")
        self.model = model
        self.rotary = rotary
        self.head_order = head_order
        if isinstance(head_counts, tuple):
            head_counts = HeadCounts(*head_counts)
        if head_counts is None and model is not None and getattr(model, "config", None) is not None:
            head_counts = HeadCounts.from_model_config(model.config)
        self.head_counts: Optional[HeadCounts] = head_counts
        self.version = 0
        self.last_report: Optional[KVReport] = None
        self.policy: Optional["KVPolicy"] = None
        """The policy a receiver runs on each applied version (set by attach_kv_policy)."""
        self._entries: list[KVEntry] = []
        self._lock = threading.RLock()
        self._rope: Optional[RopeSnapshot] = None

    # ---------------------------------------------------------------- registration
    def register(self, cache: Any, token_ids: Any, *, head_order: Optional[str] = None, head_axis: int = 1,
                 seq_axis: int = 2) -> KVEntry:
        """Register ``cache`` (a transformers Cache, or a list of per-layer (K, V) tensors).

        ``token_ids``: the tokens the cache was computed from ([length] or [batch, length]); keep
        them current with :meth:`KVEntry.extend`. ``head_order``: the order of an expanded cache
        (default: the engine's). ``head_axis`` / ``seq_axis``: axes of plain tensors (head_dim is
        last). Registering a cache again replaces its entry.
        """
        order = self.head_order if head_order is None else head_order
        if order not in ORDERS:
            raise KVMigrationError(f"head order must be one of {', '.join(ORDERS)}, got {order!r}")
        ref = make_ref(cache, head_axis, seq_axis)
        tokens = as_token_tensor(token_ids)
        with self._lock:
            entry = KVEntry(ref, tokens, self.version, self.current_rope(), order)
            self._entries = [e for e in self._entries if e.ref.alive() and not _same_cache(e, cache)]
            self._entries.append(entry)
        return entry

    def unregister(self, cache: Any) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e.ref.alive() and not _same_cache(e, cache)]

    def entries(self) -> list[KVEntry]:
        """Live entries (not dropped, cache not collected)."""
        with self._lock:
            self._entries = [e for e in self._entries if e.ref.alive() and not e.dropped]
            return list(self._entries)

    def entry_for(self, cache: Any) -> Optional[KVEntry]:
        return next((e for e in self.entries() if _same_cache(e, cache)), None)

    def __len__(self) -> int:
        return len(self.entries())

    # ---------------------------------------------------------------- rotary state
    def current_rope(self) -> Optional[RopeSnapshot]:
        """Snapshot of the rotary state the model computes keys with now (shared while unchanged)."""
        if self.rotary is not None:
            live = [self.rotary]
        elif self.model is not None:
            live = find_rotary_modules(self.model)
        else:
            return None
        if not live:
            return None
        if self._rope is None or not self._rope.matches(live):
            self._rope = RopeSnapshot(live)
        return self._rope

    # ---------------------------------------------------------------- policy
    def apply(self, policy: "KVPolicy", version: int) -> KVReport:
        """Bring every registered cache to ``version`` with ``policy`` (called inside the apply pause).

        Never raises for one cache: a cache the policy cannot bring to the new version is dropped
        (exact: it will be prefilled again) and the reason is logged and kept in ``entry.reason``.
        """
        t0 = time.perf_counter()
        report = KVReport(version=version, policy=policy.name)
        with self._lock:
            entries = self.entries()
            self.version = version
            policy.begin(self, entries, version)
            for entry in entries:
                try:
                    done = policy.apply_entry(self, entry, version)
                except Exception as exc:  # noqa: BLE001 -- weights are already live; an unfixable cache is dropped, logged
                    reason = f"{type(exc).__name__}: {exc}"
                    log.warning("kv policy %s could not bring a cache to version %d, dropping it: %s",
                                policy.name, version, reason)
                    report.failures.append(reason)
                    drop_entry(entry, reason)
                    done = []
                report.states[entry.state] = report.states.get(entry.state, 0) + 1
                for name in done:
                    report.transforms[name] = report.transforms.get(name, 0) + 1
            self._entries = [e for e in self._entries if not e.dropped]
        report.seconds = time.perf_counter() - t0
        self.last_report = report
        if entries:
            log.debug("kv policy %s at version %d: %s (%.2f ms)", policy.name, version, report.states,
                      report.seconds * 1e3)
        return report


def _same_cache(entry: KVEntry, cache: Any) -> bool:
    current = entry.ref.get()
    if current is None:
        return False
    if isinstance(cache, (list, tuple)) and isinstance(current, list):
        return len(cache) == len(current) and all(
            isinstance(kv, (list, tuple)) and len(kv) == 2 and kv[0] is k for kv, (k, _) in zip(cache, current))
    return current is cache


def drop_entry(entry: KVEntry, reason: Optional[str] = None) -> None:
    """Invalidate ``entry`` (and reset its cache when it is a transformers Cache, freeing its memory)."""
    try:
        entry.ref.drop()
    except Exception as exc:  # noqa: BLE001 -- freeing is best effort; the entry is invalid either way
        log.warning("could not reset a dropped KV cache: %s", exc)
    entry.state = "dropped"
    entry.reason = reason

