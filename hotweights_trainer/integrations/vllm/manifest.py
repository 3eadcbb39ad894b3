"""The tensors a vLLM engine accepts, in checkpoint (Hugging Face) names, shapes and dtype.

After start-up vLLM fuses and repacks its layers (``qkv_proj``, ``gate_up_proj``, empty ``.weight``
tensors on CPU), so its own parameters cannot tell whether a version fits. The checkpoint layout can:
the same architecture built from the engine's Hugging Face config on the ``meta`` device costs no
memory, and its state dict names every tensor the trainer may send with its full (unsharded) shape.
Receivers check each version against it before anything is loaded, so a version that does not fit
is refused with the tensors named and the engine keeps its weights.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def checkpoint_model(hf_config: Any, dtype: torch.dtype) -> Optional[torch.nn.Module]:
    """The Hugging Face model for ``hf_config`` on the meta device, or None when transformers cannot
    build it (the version is then checked by vLLM's loader only, which is logged)."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any architecture transformers cannot build: check less, say so
        log.warning("cannot build the checkpoint layout of %s (%s: %s); versions are not checked against "
                    "it before loading", getattr(hf_config, "model_type", "?"), type(exc).__name__, exc)
        return None
    return model
