"""Optional vLLM worker extension: ask the workers which hotweights version each one holds.

vLLM mixes ``worker_extension_cls`` into every worker, and its methods become callable by name with
``collective_rpc`` (in every engine mode, also through ``vllm serve``'s dev routes). Only needed by
callers that must know exactly which version is live, e.g. an RL generator that labels each rollout
with the version that produced it (``update_weights`` loads the newest committed version >= the one
asked for)::

    llm = LLM(model, weight_transfer_config=WeightTransferConfig(backend="hotweights"),
              worker_extension_cls="hotweights_trainer.integrations.vllm.worker_ext.HotweightsWorkerExtension")
    versions = llm.collective_rpc("get_hotweights_version")   # one per worker (TP/PP rank)
"""

from __future__ import annotations


class HotweightsWorkerExtension:
    def get_hotweights_version(self) -> int:
        """The hotweights version this worker's model holds (0 before the first update)."""
        engine = getattr(self, "weight_transfer_engine", None)
        return int(getattr(engine, "version", 0) or 0)

    def get_hotweights_apply_seconds(self) -> float:
        """How long this worker's last load took (the generation pause), in seconds."""
        engine = getattr(self, "weight_transfer_engine", None)
        return float(getattr(engine, "last_apply_seconds", 0.0) or 0.0)
