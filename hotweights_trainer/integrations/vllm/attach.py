"""Attach a vLLM engine to a publisher: the ``vllm=`` argument of the training-loop integrations."""

from __future__ import annotations

from typing import Any, Optional

from ...config import SyncConfig
from ...publisher import WeightPublisher


def attach_vllm(publisher: WeightPublisher, target: Any, config: Optional[SyncConfig] = None,
                model: Any = None) -> Any:
    """Make ``target`` (an ``LLM``, a ``vllm serve`` URL, a sync client or a ready ``VLLMUpdater``)
    load every version ``publisher`` commits; its workers are pointed at the endpoint now.
    ``model``: the model that will be published; a PeftModel with ``peft_mode=adapter`` makes the
    engine serve each version as a LoRA adapter (see :mod:`.lora`)."""
    from .updater import VLLMUpdater

    updater = target if isinstance(target, VLLMUpdater) else VLLMUpdater(
        target, str(publisher.endpoint), config=config or publisher.config, peft_model=model)
    if not updater.initialized:
        updater.init()
    publisher.add_commit_hook(updater)
    return updater
