"""Where a coordinator's state lives. :class:`MemoryStore` keeps it in the process (embedded default).

A store answers three questions for :class:`~.coordinator.Coordinator`:

- ``ensure_leader()``: may this process write the fleet's state now? Raises
  :class:`~hotweights_trainer.errors.NotLeaderError` if not; returns True when leadership was
  (re)gained since the last call, so the coordinator reloads the state before using it.
- ``load()``: the stored pieces ``(meta, members, open, handles)``, or None when nothing is stored.
- ``flush(state, dirty)``: write exactly the pieces named in ``dirty``, atomically, or raise.

The Redis store (:mod:`.redis_store`) persists and fences; this one does neither because nothing
outside the process can see or change its state.
"""

from __future__ import annotations

from typing import Any, Optional


class MemoryStore:
    kind = "memory"

    def ensure_leader(self) -> bool:
        return False  # always the only writer; the state object in memory is the truth

    def load(self) -> Optional[tuple[Any, dict, Any, dict]]:
        return None

    def flush(self, state: Any, dirty: set[str]) -> None:
        return None

    def leader_info(self) -> dict[str, Any]:
        return {"store": "memory"}

    def holds_lease(self) -> bool:
        return True

    def close(self) -> None:
        return None


__all__ = ["MemoryStore"]
