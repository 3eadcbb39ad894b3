"""A tiny Llama and its tokenizer, made locally: nothing is downloaded (imported by the vLLM recipes).

vLLM needs a model folder (config, weights, tokenizer). This writes one from a ``LlamaConfig`` with
random weights and a byte-level BPE tokenizer trained on a few sentences. CPU attention in vLLM needs
a head size of at least 32, hence 2 heads of 32 with one KV head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "hotweights moves weights from the trainer to inference, whole or not at all.",
    "every version is verified, bit for bit, before it goes live.",
    "the quick brown fox jumps over the lazy dog.",
    "abcdefghijklmnopqrstuvwxyz 0123456789",
]


def llama_config(*, hidden: int = 64, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                 intermediate: int = 128, vocab: int = 320, dtype: str = "float32") -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=256, tie_word_embeddings=False, dtype=dtype,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_tiny_llama(folder: str | Path, *, seed: int = 0, **config: Any) -> Path:
    """Write config, safetensors weights and tokenizer of a random tiny Llama into ``folder``."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    cfg = llama_config(**config)
    tokenizer = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, config.get("dtype", "float32")))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_hf(folder: str | Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python recipes/tiny_llama.py FOLDER")
    print(make_tiny_llama(sys.argv[1]))
