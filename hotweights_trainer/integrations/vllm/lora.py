"""Adapter mode into vLLM: each adapter-form version becomes a vLLM LoRA adapter (a peft directory).

With ``SyncConfig.peft_mode = "adapter"`` only a PeftModel's adapter tensors travel. vLLM serves
LoRA adapters from peft directories (``adapter_model.safetensors`` + ``adapter_config.json``) named
by a ``LoRARequest``, so the backend turns each version into one such directory; the base weights
are never touched. Who does what:

=====================  =======================================================================
step                   where
=====================  =======================================================================
the adapter config     trainer: :func:`lora_init_info` takes the active adapter's ``LoraConfig``
                       (``peft_config[name].to_dict()``) into ``init_info["lora_config"]``
layout to check        each worker: :func:`adapter_reference` builds the engine's Hugging Face
                       model on the ``meta`` device wrapped by ``get_peft_model`` with that config;
                       its adapter tensors (names, shapes, dtype) are what a version must hold,
                       all of them (``WeightReceiver(require_complete=True)``)
agreement              every rank stages and agrees on the version as for base weights
                       (:mod:`.agreement`), so the adapter is written only when all ranks have it
the directory          rank 0: :func:`write_adapter` -- peft's own ``get_peft_model_state_dict``
                       renames the tensors as ``save_pretrained`` does (adapter name removed), into
                       a temporary directory renamed to ``<lora_dir>/v<version>`` when complete;
                       other than the last :data:`KEEP` it wrote, version directories are removed
serving                trainer: ``VLLMUpdater`` adds ``LoRARequest("<name>-v<version>", version,
                       <lora_dir>/v<version>)`` to an ``LLM`` after the update round and removes
                       the previous adapter once the new one loaded; a ``vllm serve`` reloads one
                       adapter name in place (``/v1/load_lora_adapter``)
=====================  =======================================================================

The directory must be on the engine's host (rank 0 writes it, every worker reads it when vLLM loads
the adapter). peft is imported only when adapter mode is used.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from ...errors import ConfigError, InferenceUpdateError, missing_dependency
from .options import LoraOptions

log = logging.getLogger(__name__)

KEEP = 2
"""Adapter directories kept: the one just written and the one served until it is loaded (vLLM drops
its loaded adapters at every ``finish_weight_update`` and reloads the served one from disk if asked)."""
_VERSION_DIR = re.compile(r"v(\d+)")
_TEMP_DIR = re.compile(r"\.v\d+-.+")


def adapter_path(directory: str, version: int) -> str:
    """Where version ``version`` of the adapter is written under ``directory``."""
    return str(Path(directory) / f"v{int(version)}")


# ------------------------------------------------------------------------------------------ trainer side
def lora_init_info(model: Any, directory: str) -> dict[str, Any]:
    """``init_info`` keys of adapter mode for ``model`` (a PeftModel with a LoRA adapter active)."""
    config = getattr(model, "peft_config", None)
    adapter = getattr(model, "active_adapter", None)
    if not isinstance(config, dict) or adapter not in config:
        raise ConfigError(f"adapter mode into vLLM needs a peft PeftModel with an active adapter, got "
                          f"{type(model).__name__}")
    data = json.loads(json.dumps(config[adapter].to_dict(), default=_plain))
    return {"lora_dir": directory, "lora_config": data, "lora_adapter": adapter}


def _plain(value: Any) -> Any:
    # LoraConfig.to_dict() keeps sets (target_modules) and enums; init_info crosses msgpack and HTTP.
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


# ------------------------------------------------------------------------------------------ worker side
def check_engine(engine_lora_config: Any, options: LoraOptions) -> None:
    """Raise ConfigError unless the engine (vLLM's ``LoRAConfig`` or None) can serve this adapter."""
    if engine_lora_config is None:
        r = options.config["r"]
        raise ConfigError(f"adapter-mode versions (peft_mode=adapter) become vLLM LoRA adapters, but this "
                          f"engine was started without LoRA support: start it with enable_lora=True and "
                          f"max_lora_rank >= {r} (vllm serve: --enable-lora --max-lora-rank {r}), or publish "
                          "with peft_mode=merged (HOTWEIGHTS_PEFT_MODE=merged)")
    ranks = [options.config["r"], *(v for v in (options.config.get("rank_pattern") or {}).values())]
    if max(ranks) > engine_lora_config.max_lora_rank:
        raise ConfigError(f"the adapter has rank {max(ranks)} but this engine serves LoRA ranks up to "
                          f"max_lora_rank={engine_lora_config.max_lora_rank}: start it with max_lora_rank >= "
                          f"{max(ranks)}")


def adapter_reference(hf_config: Any, dtype: torch.dtype, options: LoraOptions) -> torch.nn.Module:
    """The engine's Hugging Face model on the meta device wrapped with the trainer's LoRA config."""
    try:
        from peft import PeftConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise missing_dependency("peft", "peft") from exc
    try:
        config = PeftConfig.from_peft_type(**options.config)
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            return get_peft_model(base, config, adapter_name=options.adapter)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # peft validates the config and its target modules against the model; say which side is wrong.
        raise ConfigError(f"hotweights init_info 'lora_config' does not fit this engine's model "
                          f"({getattr(hf_config, 'model_type', '?')}): {type(exc).__name__}: {exc}") from exc


def write_adapter(directory: str, version: int, tensors: Iterable[tuple[str, torch.Tensor]],
                  reference: torch.nn.Module, adapter: str, keep: Iterable[int] = ()) -> str:
    """Write one verified version as a peft adapter directory, atomically; returns its path.

    A reader sees either no ``v<version>`` or a complete one: the files go to a temporary directory
    beside it that is renamed when complete. Afterwards every other ``v<n>`` directory is removed
    except those in ``keep`` (the writer's previous version, which vLLM may still load from disk).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = Path(directory)
    final = Path(adapter_path(directory, version))
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=root))
        try:
            # The tensors are views into received buffers (several per buffer); safetensors refuses
            # tensors that share memory, and the adapter is small, so each is copied.
            state = {name: t.detach().clone() for name, t in tensors}
            named = get_peft_model_state_dict(reference, state_dict=state, adapter_name=adapter,
                                              save_embedding_layers=False)
            save_file({k: v.contiguous() for k, v in named.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            reference.peft_config[adapter].save_pretrained(str(tmp))
            if final.exists():  # a version number seen before (a new publisher session): replace it whole
                old = Path(tempfile.mkdtemp(prefix=f".v{version}-old-", dir=root))
                final.rename(old / final.name)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise InferenceUpdateError(version, f"cannot write adapter version {version} to {final}: "
                                            f"{exc}") from exc
    _prune(root, {int(version), *keep})
    log.info("adapter version %d written to %s (%d tensors)", version, final, len(named))
    return str(final)


def _prune(root: Path, keep: set[int]) -> None:
    """Remove version directories not in ``keep`` and temporaries of failed writes.

    By what this writer wrote, not by number: a new publisher session numbers from 1 again, and the
    directories of the old one must go while the one just served stays.
    """
    for path in root.iterdir():
        m = _VERSION_DIR.fullmatch(path.name)
        if path.is_dir() and ((m and int(m.group(1)) not in keep) or _TEMP_DIR.fullmatch(path.name)):
            shutil.rmtree(path, ignore_errors=True)  # best effort: a leftover directory only costs disk


def request(name: str, version: int, directory: str) -> Any:
    """vLLM's ``LoRARequest`` for one adapter version. vLLM caches adapters by ``lora_int_id``, so
    each version has its own id (the version), and its own name because requests compare by name."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"{name}-v{int(version)}", int(version), adapter_path(directory, version))


__all__ = ["KEEP", "adapter_path", "adapter_reference", "check_engine", "lora_init_info", "request",
           "write_adapter"]
