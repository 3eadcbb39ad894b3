"""``StepPusher``: the part every training-loop integration shares.

It counts real optimizer steps, pushes every ``every_n_steps`` of them, and makes every rank take
part in each push (ZeRO-3 gathers are collective) while only the global main rank owns a
:class:`~hotweights_trainer.publisher.WeightPublisher` and sends. Errors follow ``config.on_error``.

The global main rank is ``torch.distributed.get_rank() == 0`` whenever a process group exists:
launchers and wrappers disagree on what "main process" means (Accelerate driving DeepSpeed reports
process 0 on every rank), the process group does not.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..config import SyncConfig
from ..errors import ConfigError, HotweightsError
from ..publisher import PublishResult, WeightPublisher
from .gather import finish, publish_source

log = logging.getLogger(__name__)


def global_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def check_every_n(every_n_steps: Any) -> int:
    if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
        raise ConfigError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
    return every_n_steps


class StepPusher:
    """Counts optimizer steps and pushes weights every ``every_n_steps`` of them, from every rank."""

    def __init__(self, endpoint: str, *, every_n_steps: int = 1, config: Optional[SyncConfig] = None,
                 is_main: Optional[bool] = None, vllm: Any = None):
        self.every_n_steps = check_every_n(every_n_steps)
        self.endpoint = endpoint
        self.config = config if config is not None else SyncConfig.from_env()
        self.is_main = global_rank() == 0 if is_main is None else bool(is_main)
        self.optimizer_steps = 0
        """Real optimizer steps seen (accumulation micro-steps and skipped steps excluded)."""
        self.results: list[PublishResult] = []
        self.errors: list[HotweightsError] = []
        self.last_result: Optional[PublishResult] = None
        self._last_pushed_step: Optional[int] = None
        self._closed = False
        # Created now, on the main rank only, so receivers can connect before the first step.
        self.publisher: Optional[WeightPublisher] = (
            WeightPublisher(endpoint, config=self.config) if self.is_main else None)
        self.vllm = vllm
        """On the main rank, the ``VLLMUpdater`` that loads every version into a vLLM engine."""
        if vllm is not None and self.publisher is not None:
            from .vllm.attach import attach_vllm

            self.vllm = attach_vllm(self.publisher, vllm, self.config)

    def wait_for_receivers(self, n: int, timeout: Optional[float] = None) -> int:
        """On the main rank, block until ``n`` receivers are connected; elsewhere return 0 at once."""
        if self.publisher is None:
            return 0
        return self.publisher.wait_for_receivers(n, timeout)

    def optimizer_stepped(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        """Record one real optimizer step; push when it is the ``every_n_steps``-th. Call on every rank."""
        self.optimizer_steps += 1
        if self.optimizer_steps % self.every_n_steps:
            return None
        return self.push(model, step=self.optimizer_steps if step is None else step)

    def push(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        """Publish ``model`` now (every rank must call this together). The result on the main rank."""
        if self._closed:
            raise HotweightsError(f"weight sync to {self.endpoint} is closed")
        step = self.optimizer_steps if step is None else int(step)
        self._last_pushed_step = step
        source = None
        try:
            source = publish_source(model, is_main=self.is_main, bucket_bytes=self.config.bucket_bytes,
                                    peft_mode=self.config.peft_mode)
            if source is None or self.publisher is None:
                return None
            result = self.publisher.publish(source, step=step)
        except HotweightsError as exc:
            self.errors.append(exc)
            if self.config.on_error == "raise":
                raise
            log.warning("weight push at step %d failed (on_error=warn, training continues): %s", step, exc)
            return None
        finally:
            finish(source)  # completes a ZeRO-3 gather stopped by an error, so no rank is left waiting
        self.last_result = result
        self.results.append(result)
        return result

    def push_final(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        """Push unless the last push already carried these weights (e.g. at the end of training)."""
        step = self.optimizer_steps if step is None else int(step)
        if self._last_pushed_step == step:
            return None
        return self.push(model, step=step)

    def close(self) -> None:
        self._closed = True
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    def __enter__(self) -> "StepPusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
