"""Registers the ``"hotweights"`` backend with vLLM's weight-transfer factories.

vLLM runs every ``vllm.general_plugins`` entry point in each of its processes (API server, engine
core, workers), and this package declares :func:`register` as one, so after ``pip install
hotweights_trainer`` the backend name works with no user code:
``LLM(..., weight_transfer_config=WeightTransferConfig(backend="hotweights"))`` or
``vllm serve ... --weight-transfer-config '{"backend": "hotweights"}'``.
Registration is lazy (module path and class name): nothing of hotweights is imported until the
backend is used.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

BACKEND = "hotweights"
_PACKAGE = "hotweights_trainer.integrations.vllm"


def register() -> None:
    """Register the worker and trainer engines under :data:`BACKEND` (idempotent)."""
    try:
        from vllm.distributed.weight_transfer.factory import (WeightTransferEngineFactory,
                                                              WeightTransferTrainerFactory)
    except ImportError:  # a vLLM without the weight-transfer API: nothing to register with
        log.debug("vLLM has no weight-transfer factories; the %r backend is not registered", BACKEND)
        return
    for factory, module, cls in (
        (WeightTransferEngineFactory, f"{_PACKAGE}.worker_engine", "HotweightsWeightTransferEngine"),
        (WeightTransferTrainerFactory, f"{_PACKAGE}.trainer_engine", "HotweightsTrainerEngine"),
    ):
        try:
            factory.register_engine(BACKEND, module, cls)
        except ValueError:
            pass  # already registered in this process (the entry point runs once per plugin load)
