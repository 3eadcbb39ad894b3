"""``HotweightsCallback``: publish weights from a Hugging Face ``Trainer`` after optimizer steps.

Add it with ``Trainer(..., callbacks=[HotweightsCallback("shm://policy")])``. Every rank may run it:
only the global main process creates the publisher and sends. It publishes in ``on_step_end`` (after
the optimizer step, so never inside gradient accumulation) every ``every_n_steps`` global steps, and
the final weights in ``on_train_end``. ``hotweights/version``, ``hotweights/sync_seconds`` and
``hotweights/bytes`` are added to the Trainer's logs.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from ..config import SyncConfig
from ..errors import ConfigError, HotweightsError, missing_dependency
from ..publisher import PublishResult, WeightPublisher

try:
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - exercised only without the hf extra
    raise missing_dependency("transformers", "hf") from _exc

log = logging.getLogger(__name__)


class HotweightsCallback(TrainerCallback):
    def __init__(self, endpoint: str, *, every_n_steps: int = 1, config: Optional[SyncConfig] = None,
                 close_on_train_end: bool = True):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.endpoint = endpoint
        self.every_n_steps = every_n_steps
        self.config = config if config is not None else SyncConfig.from_env()
        self.close_on_train_end = close_on_train_end
        self.publisher: Optional[WeightPublisher] = None
        self.last_result: Optional[PublishResult] = None
        self.results: list[PublishResult] = []
        self.errors: list[HotweightsError] = []
        self._last_step: Optional[int] = None
        self._unlogged: dict[str, float] = {}

    # ---------------------------------------------------------------- rank handling
    @staticmethod
    def _is_main(state: Any) -> bool:
        return bool(getattr(state, "is_world_process_zero", True))

    def _ensure_publisher(self) -> WeightPublisher:
        if self.publisher is None:
            self.publisher = WeightPublisher(self.endpoint, config=self.config)
        return self.publisher

    def tensors(self, model: Any, state: Any) -> Optional[Iterable]:
        """What to publish from ``model``. Runs on every rank; returns None on ranks that don't send.

        Sharded models (DeepSpeed ZeRO-3) need every rank to take part in gathering, so this is the
        hook the DeepSpeed integration extends; for ordinary models only the main rank returns them.
        """
        from .gather import publish_source

        return publish_source(model, is_main=self._is_main(state), bucket_bytes=self.config.bucket_bytes)

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._is_main(state):
            self._ensure_publisher()  # receivers can connect before the first step

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and state.global_step % self.every_n_steps == 0:
            self._push(model, state)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self._last_step != state.global_step:
            self._push(model, state)
        if self.close_on_train_end:
            self.close()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if logs is None or not self._unlogged:
            return
        logs.update(self._unlogged)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(self._unlogged)
        self._unlogged = {}

    # ---------------------------------------------------------------- push
    def _push(self, model: Any, state: Any) -> None:
        step = int(state.global_step)
        self._last_step = step
        try:
            source = self.tensors(model, state)
            if source is None:
                return
            result = self._ensure_publisher().publish(source, step=step)
        except HotweightsError as exc:
            self.errors.append(exc)
            if self.config.on_error == "raise":
                raise
            log.warning("weight push at step %d failed (on_error=warn, training continues): %s", step, exc)
            return
        self.last_result = result
        self.results.append(result)
        self._unlogged = {"hotweights/version": result.version, "hotweights/sync_seconds": result.seconds,
                          "hotweights/bytes": result.bytes_sent}

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
