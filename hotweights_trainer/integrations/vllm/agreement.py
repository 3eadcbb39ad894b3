"""Every rank of one vLLM engine loads the same hotweights version, or none does.

Each worker (TP/PP rank) has its own receiver, and commits reach them independently: at the moment
``update_weights`` runs, rank 0 may already hold version 7 while rank 1 still holds 6, and a newer
commit may replace what a rank holds at any time. The ranks therefore agree over the engine's CPU
process group, in rounds that every rank runs in lockstep (each decision below depends only on
all-reduced values, so all ranks take the same branch and call the same collectives):

1. each rank waits (within the deadline) until a committed version >= the target is staged, and
   contributes (failed?, that version);
2. if any rank failed, every rank raises (the failing rank its own error); if the versions differ,
   the target becomes the highest and the round repeats;
3. every rank takes that version out of its receiver, so no newer commit can replace it; if any rank
   could not (a newer commit replaced it a moment earlier), every rank hands its version back and the
   round repeats.

Only then is anything loaded. A single-rank engine runs the same steps without collectives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...errors import HotweightsError, SyncTimeoutError, VersionAbortedError
from ...receiver import WeightReceiver
from ...receive.staging import StagedVersion

log = logging.getLogger(__name__)


@dataclass
class RankGroup:
    """The ranks of one engine and the CPU (gloo) group they all-reduce over (None for one rank)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @classmethod
    def of_vllm_world(cls) -> "RankGroup":
        from vllm.distributed.parallel_state import get_world_group

        world = get_world_group()
        if world.world_size == 1:
            return cls()
        return cls(rank=world.rank_in_group, size=world.world_size, group=world.cpu_group)

    def max(self, values: list[int]) -> list[int]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return t.tolist()


def agree_and_take(receiver: WeightReceiver, group: RankGroup, min_version: int, live_version: int,
                   timeout_s: float) -> Optional[StagedVersion]:
    """The staged version every rank takes, or None when the newest agreed version is already live.

    Raises the local error (or :class:`VersionAbortedError` naming the rank that failed) on every rank
    when any rank cannot reach the version within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    target = min_version
    rounds = 0
    while True:
        rounds += 1
        error: Optional[HotweightsError] = None
        version = 0
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncTimeoutError(f"version >= {target} was not staged on every rank within {timeout_s:.1f}s "
                                       f"({rounds - 1} round(s) of agreement)")
            version = receiver.wait_for_pending(target, timeout=left)
        except HotweightsError as exc:
            error = exc
        failed_rank, highest, neg_lowest = group.max([group.rank if error else -1, version, -version])
        if failed_rank >= 0:
            if error is not None:
                raise error
            raise VersionAbortedError(target, f"rank {failed_rank} of this engine could not stage it; "
                                              "no rank loaded anything")
        if highest != -neg_lowest:
            target = highest
            continue
        if highest <= live_version:
            return None
        staged = receiver.take_pending(highest)
        (missed,) = group.max([0 if staged is not None else 1])
        if not missed:
            if rounds > 1:
                log.info("ranks agreed on version %d after %d rounds", highest, rounds)
            return staged
        if staged is not None:
            receiver.return_taken(staged)
        target = highest
