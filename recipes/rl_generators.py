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

``GENERATORS`` maps the ``--generator`` names to factories. ``hf`` runs ``transformers``'
``generate``; ``vllm`` is the seam for an engine-backed generator (the hotweights vLLM backend) and
raises :class:`GeneratorUnavailable` until one is plugged in here. A generator that is not there
fails before anything starts, with a message saying what to use instead.
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


def _vllm_unavailable() -> str:
    # The seam for a generator on a vLLM engine fed by the hotweights vLLM backend: plugging one in
    # means adding its class to GENERATORS (keeping the Generator protocol above) and removing this.
    return ("--generator vllm: no vLLM-backed generator is plugged into recipes/rl_generators.py "
            "(GENERATORS) yet; use --generator hf")


GENERATORS: dict[str, Callable[..., Any]] = {"hf": HFGenerator}
UNAVAILABLE: dict[str, Callable[[], str]] = {"vllm": _vllm_unavailable}


def check_generator(name: str) -> None:
    """Raise :class:`GeneratorUnavailable` unless ``name`` can run here (call it before starting anything)."""
    if name in UNAVAILABLE:
        raise GeneratorUnavailable(UNAVAILABLE[name]())
    if name not in GENERATORS:
        known = ", ".join([*GENERATORS, *UNAVAILABLE])
        raise GeneratorUnavailable(f"unknown generator {name!r}; choose one of {known}")


def make_generator(name: str, model: torch.nn.Module, endpoint: str, config: SyncConfig, *,
                   masked_token: int) -> Generator:
    check_generator(name)
    return GENERATORS[name](model, endpoint, config, masked_token=masked_token)
