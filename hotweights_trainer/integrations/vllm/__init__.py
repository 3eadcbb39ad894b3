"""vLLM as the inference side: the ``"hotweights"`` weight-transfer backend.

* :mod:`.worker_engine` -- inside vLLM's workers: stage versions, agree across ranks, load whole.
* :mod:`.trainer_engine` -- vLLM's trainer-side engine API on top of a ``WeightPublisher``.
* :mod:`.updater` -- ``VLLMUpdater``: after each committed version, one update call to an ``LLM`` or a
  ``vllm serve`` URL (used by the training-loop callbacks' ``vllm=`` argument).
* :mod:`.plugin` -- registration through the ``vllm.general_plugins`` entry point.

vLLM is imported only when one of these names is used.
"""

from __future__ import annotations

from typing import Any

from .plugin import BACKEND, register

__all__ = ["BACKEND", "register", "VLLMUpdater", "HotweightsWeightTransferEngine", "HotweightsTrainerEngine",
           "HotweightsTrainerInitInfo"]

_LAZY = {
    "VLLMUpdater": ".updater",
    "HotweightsWeightTransferEngine": ".worker_engine",
    "HotweightsTrainerEngine": ".trainer_engine",
    "HotweightsTrainerInitInfo": ".trainer_engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
