"""DeepSpeed: push weights after every real ``engine.step()``, ZeRO-1/2/3 alike.

::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    sync = hotweights_trainer.integrations.deepspeed.attach(engine, "shm://policy", every_n_steps=1)
    for batch in loader:
        engine.backward(engine(**batch).loss)
        engine.step()                 # pushes at gradient-accumulation boundaries
    sync.close()

Call ``attach`` on every rank. ``engine.step()`` runs once per micro-batch; the optimizer updates
(and a push may happen) only at accumulation boundaries, and not when fp16 skipped the step for
overflow. Under ZeRO-1/2 every rank holds full parameters and the main rank sends them; under ZeRO-3
every rank joins the bucket-sized gathers (see :mod:`hotweights_trainer.integrations.gather`), so no
rank ever holds much more than one bucket on top of its shard. Pushes go through the same
:class:`~.pusher.StepPusher` as the HF Trainer callback's, ``async_publish`` included.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..config import SyncConfig
from ..errors import HotweightsError
from ..publisher import PublishResult
from .pusher import StepPusher

log = logging.getLogger(__name__)


def _is_engine(engine: Any) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return isinstance(engine, DeepSpeedEngine)


class DeepSpeedSync(StepPusher):
    """Returned by :func:`attach`: pushes after real optimizer steps of one ``DeepSpeedEngine``."""

    def __init__(self, engine: Any, endpoint: str, *, every_n_steps: int = 1,
                 config: Optional[SyncConfig] = None, vllm: Any = None):
        if not _is_engine(engine):
            raise HotweightsError(f"attach() needs a deepspeed.DeepSpeedEngine, got {type(engine).__name__}")
        if "step" in vars(engine):
            raise HotweightsError("this engine's step() is already hooked (attach() was called twice?)")
        super().__init__(endpoint, every_n_steps=every_n_steps, config=config, vllm=vllm, model=engine.module)
        self.engine = engine
        self.skipped_steps = 0
        """Boundary steps that fp16 skipped for overflow: weights did not change, no push."""
        self._original_step = engine.step
        engine.step = self._step  # an instance attribute shadows the method; detach() removes it

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine
        steps_before = engine.global_steps
        out = self._original_step(*args, **kwargs)
        if engine.global_steps == steps_before:
            return out  # an accumulation micro-step
        applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
        if not applied:
            self.skipped_steps += 1
            log.info("DeepSpeed skipped the optimizer step at global step %d (overflow); no weight push",
                     engine.global_steps)
            return out
        self.optimizer_stepped(engine.module, step=engine.global_steps)
        return out

    def push(self, model: Any = None, step: Optional[int] = None) -> Optional[PublishResult]:
        """Push now (every rank together); defaults to the engine's module and its global step."""
        return super().push(self.engine.module if model is None else model,
                            step=self.engine.global_steps if step is None else step)

    def push_final(self, model: Any = None, step: Optional[int] = None) -> Optional[PublishResult]:
        return super().push_final(self.engine.module if model is None else model,
                                  step=self.engine.global_steps if step is None else step)

    def detach(self) -> None:
        """Restore the engine's own ``step``."""
        if vars(self.engine).get("step") == self._step:
            del self.engine.step

    def close(self) -> None:
        self.detach()
        super().close()


def attach(engine: Any, endpoint: str, every_n_steps: int = 1,
           config: Optional[SyncConfig] = None, vllm: Any = None) -> DeepSpeedSync:
    """Hook ``engine.step()``: push weights to ``endpoint`` every ``every_n_steps`` optimizer steps.

    ``vllm``: an ``LLM``, a ``vllm serve`` URL or a ``VLLMUpdater`` that loads each version."""
    return DeepSpeedSync(engine, endpoint, every_n_steps=every_n_steps, config=config, vllm=vllm)
