"""Accelerate: push weights from a custom ``accelerate`` training loop.

::

    sync = AccelerateSync(accelerator, "shm://policy", every_n_steps=1)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            sync.after_step(model)          # pushes only on real optimizer steps
            optimizer.zero_grad()
    sync.close()

or let the optimizer do it: ``optimizer = sync.wrap_optimizer(optimizer, model)``.

Inside gradient accumulation (``accelerator.sync_gradients`` false) and after a step that mixed
precision skipped, nothing is pushed. DDP and ``torch.compile`` wrappers are peeled off. Under
DeepSpeed (``accelerate launch`` with a DeepSpeed config) every rank takes part, ZeRO-3 included;
the global main rank comes from ``torch.distributed``, because Accelerate then reports process 0 on
every rank. Pushes go through the same :class:`~.pusher.StepPusher` as the HF Trainer callback's, so
``async_publish`` (snapshot at the step boundary, send while the next step trains) works here too.
``vllm=`` with ``peft_mode="adapter"`` needs ``model=`` (the PeftModel), or it is refused.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..config import SyncConfig
from ..errors import HotweightsError, missing_dependency
from ..publisher import PublishResult
from .pusher import StepPusher

log = logging.getLogger(__name__)


class AccelerateSync(StepPusher):
    """Weight sync for a loop driven by an ``accelerate.Accelerator``. Create it on every rank."""

    def __init__(self, accelerator: Any, endpoint: str, every_n_steps: int = 1,
                 config: Optional[SyncConfig] = None, vllm: Any = None, model: Any = None):
        try:
            from accelerate import Accelerator
        except ImportError as exc:  # pragma: no cover - exercised only without the hf extra
            raise missing_dependency("accelerate", "hf") from exc
        if not isinstance(accelerator, Accelerator):
            raise HotweightsError(
                f"AccelerateSync needs an accelerate.Accelerator, got {type(accelerator).__name__}")
        if str(getattr(accelerator, "distributed_type", "")).endswith("FSDP"):
            # FSDP shards parameters differently from ZeRO-3 and has no gather here yet: sending the
            # local shards would only end in a manifest mismatch on every receiver.
            raise HotweightsError("AccelerateSync does not support FSDP yet; use DeepSpeed ZeRO-3 or DDP")
        self.accelerator = accelerator
        super().__init__(endpoint, every_n_steps=every_n_steps, config=config, vllm=vllm,
                         model=None if model is None else self._unwrap(model))
        self.skipped_steps = 0
        """Steps that mixed precision skipped (gradient overflow): weights did not change, no push."""
        self._wrapped: list[Any] = []

    def _unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def after_step(self, model: Any) -> Optional[PublishResult]:
        """Call right after ``optimizer.step()`` on every rank. Returns the push result on the main rank."""
        if not self.accelerator.sync_gradients:
            return None  # an accumulation micro-step: the optimizer did not update anything
        if self.accelerator.optimizer_step_was_skipped:
            self.skipped_steps += 1
            log.info("optimizer step skipped (gradient overflow); no weight push")
            return None
        return self.optimizer_stepped(self._unwrap(model))

    def push(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        return super().push(self._unwrap(model), step=step)

    def push_final(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        return super().push_final(self._unwrap(model), step=step)

    def wrap_optimizer(self, optimizer: Any, model: Any) -> Any:
        """Make ``optimizer.step()`` push on its own (opt-in); returns the same optimizer object.

        Undo with :meth:`unwrap_optimizers` (also done by :meth:`close`).
        """
        if "step" in vars(optimizer):
            raise HotweightsError("this optimizer's step() is already wrapped")
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.after_step(model)
            return out

        optimizer.step = step
        self._wrapped.append(optimizer)
        return optimizer

    def unwrap_optimizers(self) -> None:
        for optimizer in self._wrapped:
            vars(optimizer).pop("step", None)
        self._wrapped.clear()

    def close(self) -> None:
        self.unwrap_optimizers()
        super().close()
