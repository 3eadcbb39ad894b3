"""Tiny Llama models with and without LoRA, built the same way in the trainer and in receiver processes."""

from __future__ import annotations

from typing import Any, Optional

import torch

LLAMA = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "embed_tokens"],
            modules_to_save=["lm_head"])


def llama(seed: int, dtype: str = "float32", **overrides: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).to(getattr(torch, dtype))


def with_lora(model: torch.nn.Module, dtype: Optional[str] = "float32", **overrides: Any) -> torch.nn.Module:
    """``get_peft_model`` with B initialised too (peft's default B = 0 would make every merge a no-op).

    ``dtype`` None keeps peft's own choice (adapters in float32 over a bf16 base)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**{**LORA, "init_lora_weights": False, **overrides}))
    return peft_model if dtype is None else peft_model.to(getattr(torch, dtype))


def is_adapter_name(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def split_digests(model: torch.nn.Module) -> dict[str, str]:
    """Combined digests of a model's adapter tensors and of everything else."""
    from hotweights_trainer.verify import combined_digest, weights_digest

    d = weights_digest(model)
    return {"adapter": combined_digest({k: v for k, v in d.items() if is_adapter_name(k)}),
            "rest": combined_digest({k: v for k, v in d.items() if not is_adapter_name(k)}),
            "all": combined_digest(d)}
