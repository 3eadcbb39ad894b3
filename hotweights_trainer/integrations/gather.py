"""Gather: what each rank contributes to a publish, whatever the sharding.

``publish_source`` runs on every rank, at the same point of the training loop.

* Replicated models (single process, DDP, DeepSpeed ZeRO-1/2, whose module holds full parameters):
  the main rank returns the model, the other ranks return None and do nothing.
* DeepSpeed ZeRO-3 (parameters carry ``ds_id`` / ``ds_numel``): no rank holds the whole model, so the
  tensors are gathered in groups of about one bucket (``bucket_bytes``, counted with ``ds_numel``
  because a partitioned parameter reports ``numel() == 0``). Every rank enters
  ``deepspeed.zero.GatheredParameters(group, modifier_rank=None)`` for every group, in the same order,
  because the gather is a collective. The main rank returns a :class:`ShardedSource` that the
  publisher consumes lazily: it yields a group's full tensors, then :data:`~hotweights_trainer.source.FLUSH`,
  so the packer copies them into a bucket before the group is released and the next one gathered.
  The other ranks run the same gathers right away and return None.

A PEFT model (:mod:`hotweights_trainer.peft_sync`) is gathered in units: a LoRA layer's base weight
and factors always share a group (its merge reads them together), its merged copy counts toward the
group's size, and tensors its ``peft_mode`` does not send (base weights in adapter mode) are never
gathered.

Extra memory on any rank is therefore one group (about ``bucket_bytes``; a single parameter larger
than that is a group of its own), never the whole model -- plus, under gloo, the backend's staging
copy of the parameter being all-gathered, so about two buckets measured on CPU. Call :func:`finish` after the publish,
whether it succeeded or not: when the main rank stopped early (an error), it runs the gathers it
skipped, so the other ranks, which are waiting in those collectives, are released.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch

from ..errors import HotweightsError, ShardingMismatchError, missing_dependency
from ..peft_sync import view_of
from ..source import FLUSH, unwrap_model

log = logging.getLogger(__name__)

Item = tuple[str, torch.Tensor]
GatherFn = Callable[[Sequence[torch.Tensor]], ContextManager[Any]]
"""Given one group's tensors, a context during which they hold their full data (every rank enters it)."""


# ---------------------------------------------------------------------------------------- ZeRO-3 tensors
def is_zero3_param(t: Any) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its local ``numel()`` is 0 outside a gather)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_numel")


def full_nbytes(t: torch.Tensor) -> int:
    """Bytes of the full tensor, also for a partitioned ZeRO-3 parameter."""
    numel = int(t.ds_numel) if is_zero3_param(t) else t.numel()
    return numel * t.element_size()


def is_sharded(model: Any) -> bool:
    """Whether any parameter of ``model`` is ZeRO-3 partitioned."""
    model = unwrap_model(model)
    return isinstance(model, torch.nn.Module) and any(is_zero3_param(p) for p in model.parameters())


def sharded_items(module: torch.nn.Module) -> list[Item]:
    """``(name, tensor)`` in state-dict order, each tensor once (tied weights keep their first name).

    ZeRO-3 parameters are told apart by identity (their storage is empty while partitioned); other
    tensors by storage, as for an unsharded model.
    """
    items: list[Item] = []
    seen: set[Any] = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        if is_zero3_param(t):
            key: Any = ("zero3", id(t))
        elif t.numel():
            key = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        else:
            key = ("empty", id(t))
        if key in seen:
            continue
        seen.add(key)
        items.append((name, t))
    return items


def plan_groups(items: Sequence[Item], group_bytes: int, *,
                unit_of: Optional[Callable[[str, torch.Tensor], str]] = None,
                size_of: Optional[Callable[[str, torch.Tensor], int]] = None) -> list[list[Item]]:
    """Split ``items`` into consecutive groups of at most ``group_bytes`` (full size).

    A tensor larger than ``group_bytes`` forms a group of its own; the packer splits it across buckets.
    ``unit_of`` names the unit of each item: consecutive items of one unit always share a group (a
    LoRA layer's base weight and factors, which its merge reads together), and a unit larger than
    ``group_bytes`` is a group of its own. ``size_of`` is what an item costs while its group is held
    (default: its full bytes; a merged weight also counts the copy it becomes).
    """
    if group_bytes < 1:
        raise HotweightsError(f"group size must be >= 1 byte, got {group_bytes}")
    units: list[tuple[list[Item], int]] = []
    last_unit: Any = object()
    for name, t in items:
        unit = unit_of(name, t) if unit_of is not None else (name, id(t))
        n = size_of(name, t) if size_of is not None else full_nbytes(t)
        if units and unit == last_unit:
            units[-1][0].append((name, t))
            units[-1] = (units[-1][0], units[-1][1] + n)
        else:
            units.append(([(name, t)], n))
        last_unit = unit
    groups: list[list[Item]] = []
    current: list[Item] = []
    used = 0
    for members, n in units:
        if current and used + n > group_bytes:
            groups.append(current)
            current, used = [], 0
        current.extend(members)
        used += n
    if current:
        groups.append(current)
    return groups


def plan_fingerprint(groups: Sequence[Sequence[Item]]) -> int:
    """A 62-bit digest of the group plan (names, full shapes, dtypes, boundaries)."""
    h = 0
    for gi, group in enumerate(groups):
        for name, t in group:
            shape = tuple(t.ds_shape) if is_zero3_param(t) else tuple(t.shape)
            h = zlib.crc32(f"{gi}|{name}|{shape}|{t.dtype};".encode(), h)
    return (h << 30) ^ (len(groups) & ((1 << 30) - 1))


def _collective_device() -> Optional[torch.device]:
    """The device DeepSpeed runs its collectives on (cuda:N under NCCL, cpu under gloo)."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return None
    return torch.device(get_accelerator().current_device_name())


def deepspeed_gather(tensors: Sequence[torch.Tensor]) -> ContextManager[Any]:
    """``GatheredParameters`` over the group's ZeRO-3 parameters (a no-op when it has none)."""
    params = [t for t in tensors if is_zero3_param(t)]
    if not params:
        return contextlib.nullcontext()
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - ZeRO-3 parameters cannot exist without it
        raise missing_dependency("deepspeed", "deepspeed") from exc
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@dataclass
class GatherStats:
    """What one sharded publish gathered, measured on this rank."""

    groups: int = 0
    gathered_groups: int = 0
    seconds: float = 0.0
    """From entering the first gather to leaving the last, the consumer's packing included."""
    group_bytes_max: int = 0
    """Largest group (full bytes of its ZeRO-3 parameters), i.e. the planned extra memory."""
    live_bytes_high: int = 0
    """Most bytes of ZeRO-3 parameters found gathered at once (checked inside every group)."""
    drained_groups: int = 0
    """Groups gathered by :meth:`ShardedSource.close` because the publish stopped early."""
    gather_seconds: list[float] = field(default_factory=list)
    """Per group: how long entering the gather (the collective itself) took."""


def _live_gathered_bytes(params: Iterable[torch.Tensor]) -> int:
    """Full bytes of the partitioned parameters that currently hold their gathered data."""
    return sum(p.numel() * p.element_size() for p in params if is_zero3_param(p) and p.numel()
               and not getattr(p, "ds_persist", False))


class ShardedSource:
    """Full tensors of a ZeRO-3 model, gathered one bucket-sized group at a time.

    Iterate it once (the publisher does); then call :meth:`close` (or use it as a context manager),
    which on every rank leaves the sequence of collective gathers complete.
    """

    def __init__(self, groups: list[list[Item]], *, is_main: bool, gather: Optional[GatherFn] = None,
                 all_params: Sequence[torch.Tensor] = (),
                 transform: Optional[Callable[[list[Item]], Iterable[Item]]] = None,
                 peft_mode: Optional[str] = None):
        self.groups = groups
        self.peft_mode = peft_mode
        """PEFT form of what this source yields (peft_sync), announced to receivers; None: plain."""
        self._transform = transform
        self.is_main = is_main
        self.stats = GatherStats(groups=len(groups),
                                 group_bytes_max=max((sum(full_nbytes(t) for _, t in g if is_zero3_param(t))
                                                      for g in groups), default=0))
        # Looked up per source rather than bound at import, so a profiler can wrap deepspeed_gather.
        self._gather = gather if gather is not None else deepspeed_gather
        self._all_params = [p for p in all_params if is_zero3_param(p)]
        self._next = 0  # index of the next group not yet gathered
        self._iterating: Optional[Iterator[Any]] = None
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self._iterating is not None or self._closed:
            raise HotweightsError("a ShardedSource can be iterated only once per publish")
        self._iterating = self._iter()
        return self._iterating

    def _enter(self, group: list[Item]) -> ContextManager[Any]:
        return self._gather([t for _, t in group])

    def _iter(self, produce: bool = True) -> Iterator[Any]:
        while self._next < len(self.groups):
            group = self.groups[self._next]
            self._next += 1
            t0 = time.perf_counter()
            with self._enter(group):
                self._account(t0)
                if not produce:  # draining: take part in the collective, compute nothing
                    pass
                elif self._transform is None:
                    for name, t in group:
                        yield name, t.detach()
                    yield FLUSH
                    del name, t
                else:  # PEFT: merged weights computed (or adapter tensors picked) while gathered
                    for item in self._transform([(name, t.detach()) for name, t in group]):
                        yield item
                    yield FLUSH
                    item = None  # noqa: F841 - our last reference into the group being released
            self.stats.seconds += time.perf_counter() - t0

    def _account(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.stats.gather_seconds.append(dt)
        self.stats.gathered_groups += 1
        if self._all_params:
            self.stats.live_bytes_high = max(self.stats.live_bytes_high,
                                             _live_gathered_bytes(self._all_params))

    def drain(self) -> None:
        """Enter and leave every gather not yet done (what the ranks that don't send do)."""
        for _ in self._iter(produce=False):
            pass

    def close(self) -> None:
        """Release the group in progress and run the gathers a stopped publish skipped."""
        if self._closed:
            return
        self._closed = True
        if self._iterating is not None:
            self._iterating.close()  # leaves the open GatheredParameters context, if any
        if self._next < len(self.groups):
            skipped = len(self.groups) - self._next
            if self.is_main:
                log.warning("publish stopped after %d of %d gather groups; running the other %d so every "
                            "rank leaves the collective gathers together", self._next, len(self.groups),
                            skipped)
            self.drain()
            self.stats.drained_groups += skipped

    def __enter__(self) -> "ShardedSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- entry points
def check_same_plan(groups: Sequence[Sequence[Item]], device: Optional[torch.device] = None) -> None:
    """Raise :class:`ShardingMismatchError` unless every rank planned the same groups.

    Two tiny all-reduces (max of the fingerprint and of its negation) instead of a hang or a garbled
    gather when ranks were started with different bucket sizes or models.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    fp = plan_fingerprint(groups)
    t = torch.tensor([fp, -fp], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != fp or int(t[1]) != -fp:
        raise ShardingMismatchError(
            f"rank {dist.get_rank()}: ranks planned different ZeRO-3 gather groups ({len(groups)} groups "
            "here); every rank must use the same model and the same HOTWEIGHTS_BUCKET_MB")


def sharded_source(model: torch.nn.Module, *, is_main: bool, bucket_bytes: int,
                   gather: Optional[GatherFn] = None, check: bool = True,
                   peft_mode: str = "merged") -> ShardedSource:
    """A :class:`ShardedSource` over ``model``'s tensors in groups of at most ``bucket_bytes``.

    A PEFT model is sent in ``peft_mode`` (see :mod:`hotweights_trainer.peft_sync`): only the tensors
    that form are gathered, a LoRA layer's pieces in one group, its merged copy counted in the group.
    """
    model = unwrap_model(model)
    items = sharded_items(model)
    view = view_of(model, peft_mode)  # every rank: refused adapters fail everywhere, before any collective
    if view is None:
        groups = plan_groups(items, bucket_bytes)
    else:
        groups = plan_groups([(n, t) for n, t in items if view.needed(n, t)], bucket_bytes,
                             unit_of=view.unit_of,
                             size_of=lambda n, t: full_nbytes(t) * (2 if view.makes_copy(n, t) else 1))
    if check:
        check_same_plan(groups, _collective_device())
    return ShardedSource(groups, is_main=is_main, gather=gather, all_params=list(model.parameters()),
                         transform=view.items if view is not None else None,
                         peft_mode=view.mode if view is not None else None)


def publish_source(model: Any, *, is_main: bool, bucket_bytes: int,
                   peft_mode: str = "merged") -> Optional[Iterable]:
    """What this rank hands to ``WeightPublisher.publish``: the model, a :class:`ShardedSource`, or None.

    Runs on every rank. On ranks that don't send, ZeRO-3 gathers are run here and None is returned.
    A replicated PEFT model is returned as it is (the publisher applies its ``peft_mode``);
    ``peft_mode`` here shapes the gathers of a sharded one, so pass the publisher's.
    """
    model = unwrap_model(model)
    if not is_sharded(model):
        return model if is_main else None
    source = sharded_source(model, is_main=is_main, bucket_bytes=bucket_bytes, peft_mode=peft_mode)
    if is_main:
        return source
    source.close()
    return None


def finish(source: Any) -> None:
    """Call after publishing ``source`` (success or failure); completes a stopped sharded gather."""
    if isinstance(source, ShardedSource):
        source.close()
