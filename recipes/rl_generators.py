"""Rollout generators for ``grpo_loop.py``: the inference side of the async RL loop, one class each.

A generator owns a :class:`~hotweights_trainer.WeightReceiver` and a model it keeps at the live
version. The loop calls, from one thread:

1. ``sync(min_version)``: apply the newest committed version, first waiting (bounded by
   ``config.timeout_s``) until one >= ``min_version`` is there. Returns the seconds spent waiting and
   the seconds the model was paused applying. Versions change only here, never inside ``generate``,
   so every rollout is made by exactly one version, ``self.version``.
2. ``generate(prompts, group, max_new_tokens, seed)``: ``group`` sampled completions per prompt,
   with the log-probability of every sampled token under the live weights (the behaviour policy the
   trainer's importance ratio divides by).
3. ``weights_digest()``: xxh3 per tensor of the live weights, so the trainer can check that a
   rollout's version is what it says.
4. ``close()``.

``GENERATORS`` maps the ``--generator`` names to factories. ``vllm`` samples with a vLLM engine fed
by the hotweights vLLM backend (the default where vLLM is installed); ``hf`` runs ``transformers``'
``generate`` on a model a ``WeightReceiver`` updates in place. A generator that cannot run here
fails before anything starts, with a message saying what to install or use instead.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import torch

from hotweights_trainer import HotweightsError, SyncConfig, SyncTimeoutError, WeightReceiver
from hotweights_trainer.verify import weights_digest


class GeneratorUnavailable(HotweightsError):
    """The requested generator cannot run here; the message says what to install or use instead."""


class Generator(Protocol):
    version: int

    def sync(self, min_version: int) -> tuple[float, float]: ...

    def generate(self, prompts: torch.Tensor, group: int, max_new_tokens: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def weights_digest(self) -> dict[str, str]: ...

    def close(self) -> None: ...


class HFGenerator:
    """Samples with ``model.generate`` on a Hugging Face causal LM updated in place by the receiver."""

    def __init__(self, model: torch.nn.Module, endpoint: str, config: SyncConfig, *, masked_token: int):
        self.model = model.eval()
        self.masked_token = masked_token
        self.config = config
        self.receiver = WeightReceiver(endpoint, model=model, config=config)

    @property
    def version(self) -> int:
        return self.receiver.version

    def sync(self, min_version: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.config.timeout_s
        pause = 0.0
        while True:
            tp = time.perf_counter()
            if self.receiver.poll() is not None:  # applies the newest committed version, if any
                pause += time.perf_counter() - tp
            if self.receiver.version >= min_version:
                return time.perf_counter() - t0 - pause, pause
            if time.monotonic() > deadline:
                raise SyncTimeoutError(f"generator: no version >= {min_version} within "
                                       f"{self.config.timeout_s:.1f}s (live {self.receiver.version})")
            time.sleep(0.0005)  # a short sleep, not the receiver's wait: pauses are measured per apply

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, group: int, max_new_tokens: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        ids = prompts.repeat_interleave(group, dim=0)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            eos_token_id=self.masked_token, pad_token_id=self.masked_token, output_scores=True,
            return_dict_in_generate=True)
        completions = out.sequences[:, ids.shape[1]:]
        # The scores are the distribution actually sampled from (min_new_tokens masks the end token),
        # so these are exact behaviour log-probabilities.
        logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
        return completions, logps.gather(-1, completions.unsqueeze(-1)).squeeze(-1)

    def weights_digest(self) -> dict[str, str]:
        return weights_digest(self.model)

    def close(self) -> None:
        self.receiver.close()


class VLLMGenerator:
    """Samples with a vLLM engine whose workers follow the trainer through the hotweights backend.

    The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the generator is already a
    process of its own) from a folder holding the generator's initial model; prompts are token ids,
    so no tokenizer is needed. ``sync`` asks vLLM to load the newest committed version >= the one
    needed (one ``update_weights`` call; the workers staged it in the background) and reads back
    which version each worker holds. vLLM's weights are fused and repacked, so they cannot be
    fingerprinted under the trainer's names: ``weights_digest`` returns None and every rollout
    instead carries the version the workers report as live (``live_version``), which the trainer
    checks. Bit-exactness of what vLLM loads is tested on its own (tests/test_vllm.py).
    """

    EXTENSION = "hotweights_trainer.integrations.vllm.worker_ext.HotweightsWorkerExtension"

    def __init__(self, model: torch.nn.Module, endpoint: str, config: SyncConfig, *, masked_token: int):
        import os
        import tempfile

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        self.masked_token = masked_token
        self.config = config
        self._folder = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
        model.save_pretrained(self._folder.name)
        self.llm = LLM(self._folder.name, dtype="float32", skip_tokenizer_init=True,
                       max_model_len=model.config.max_position_embeddings, kv_cache_memory_bytes=16 << 20,
                       enforce_eager=True, logprobs_mode="processed_logprobs", seed=0,
                       worker_extension_cls=self.EXTENSION,
                       weight_transfer_config=WeightTransferConfig(backend="hotweights"))
        self.llm.init_weight_transfer_engine({"init_info": {"endpoint": endpoint, "timeout_s": config.timeout_s,
                                                            "delta": config.delta}})
        self.version = 0

    def sync(self, min_version: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        llm = self.llm
        llm.start_weight_update()
        llm.update_weights({"update_info": {"version": max(1, min_version), "timeout_s": self.config.timeout_s}})
        versions = llm.collective_rpc("get_hotweights_version")
        llm.finish_weight_update(str(versions[0]))
        llm.reset_prefix_cache()
        changed = versions[0] != self.version
        self.version = versions[0]
        total = time.perf_counter() - t0
        pause = max(llm.collective_rpc("get_hotweights_apply_seconds")) if changed else 0.0
        return max(total - pause, 0.0), pause

    def generate(self, prompts: torch.Tensor, group: int, max_new_tokens: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # min_tokens keeps the end token out, as the trainer's mask does; processed log-probabilities
        # are those of that masked distribution, the one actually sampled from.
        params = SamplingParams(n=group, temperature=1.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens,
                                seed=seed, logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params,
                                 use_tqdm=False)
        completions, logps = [], []
        for out in outs:
            for c in out.outputs:
                completions.append(list(c.token_ids))
                logps.append([step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)])
        return torch.tensor(completions), torch.tensor(logps)

    def weights_digest(self) -> None:
        return None

    def live_version(self) -> int:
        versions = self.llm.collective_rpc("get_hotweights_version")
        if len(set(versions)) != 1:
            raise HotweightsError(f"vLLM workers hold different versions: {versions}")
        return versions[0]

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self._folder.cleanup()


def _vllm_unavailable() -> str:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ("--generator vllm: vLLM is not installed (pip install 'hotweights_trainer[vllm]'); "
                "use --generator hf")
    return ""


GENERATORS: dict[str, Callable[..., Any]] = {"hf": HFGenerator, "vllm": VLLMGenerator}
UNAVAILABLE: dict[str, Callable[[], str]] = {"vllm": _vllm_unavailable}


def default_generator() -> str:
    """vLLM where it is installed, else transformers' generate (said once, on stderr, by the recipe)."""
    return "hf" if _vllm_unavailable() else "vllm"


def check_generator(name: str) -> None:
    """Raise :class:`GeneratorUnavailable` unless ``name`` can run here (call it before starting anything)."""
    reason = UNAVAILABLE[name]() if name in UNAVAILABLE else ""
    if reason:
        raise GeneratorUnavailable(reason)
    if name not in GENERATORS:
        known = ", ".join(sorted({*GENERATORS, *UNAVAILABLE}))
        raise GeneratorUnavailable(f"unknown generator {name!r}; choose one of {known}")


def make_generator(name: str, model: torch.nn.Module, endpoint: str, config: SyncConfig, *,
                   masked_token: int) -> Generator:
    check_generator(name)
    return GENERATORS[name](model, endpoint, config, masked_token=masked_token)
