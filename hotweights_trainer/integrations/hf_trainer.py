"""``HotweightsCallback``: publish weights from a Hugging Face ``Trainer`` after optimizer steps.

Add it with ``Trainer(..., callbacks=[HotweightsCallback("shm://policy")])``. Every rank may run it:
only the global main process creates the publisher and sends. It publishes in ``on_step_end`` (after
the optimizer step, so never inside gradient accumulation) every ``every_n_steps`` global steps, and
the final weights in ``on_train_end``. ``hotweights/version``, ``hotweights/sync_seconds`` and
``hotweights/bytes`` are added to the Trainer's logs.

Start and end of a run: with ``min_receivers`` (``HOTWEIGHTS_MIN_RECEIVERS``) the first push waits
for that many inference processes, so a run shorter than their start-up does not publish to nobody;
closing the publisher in ``on_train_end`` keeps serving the final version (``linger_s``) to
receivers that do not have it yet.

Resumed runs: each checkpoint the Trainer saves gets a weights sidecar (``on_save``). When training
resumes from it, the parameters whose bytes differ from the sidecar count as updated, and
``opt_policy`` (preserve / reset / attenuate; default ``HOTWEIGHTS_OPT_POLICY``) is applied once to their
optimizer state in ``on_train_begin``, after the Trainer loaded it (see ``hotweights_trainer.optim``).
The report goes to the log and into the Trainer's log history as ``hotweights/opt_*``.

With ``SyncConfig.async_publish`` the weights are snapshotted at the step boundary and pushed from a
background thread (:class:`~hotweights_trainer.async_publisher.AsyncPublisher`) while the next step
trains; the logs then show the newest push that finished. Training end waits for queued pushes and
always sends the final weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional

from ..config import SyncConfig
from ..errors import ConfigError, HotweightsError, missing_dependency
from ..async_publisher import AsyncPublisher
from ..publisher import PublishResult, WeightPublisher
from .gather import finish

try:
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - exercised only without the hf extra
    raise missing_dependency("transformers", "hf") from _exc

log = logging.getLogger(__name__)


class HotweightsCallback(TrainerCallback):
    def __init__(self, endpoint: str, *, every_n_steps: int = 1, config: Optional[SyncConfig] = None,
                 close_on_train_end: bool = True, opt_policy: Optional[str] = None,
                 opt_attenuation: Optional[float] = None, vllm: Any = None):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.endpoint = endpoint
        self.every_n_steps = every_n_steps
        self.config = config if config is not None else SyncConfig.from_env()
        self.close_on_train_end = close_on_train_end
        self.vllm = vllm
        """An ``LLM``, a ``vllm serve`` URL or a ``VLLMUpdater`` that loads every published version."""
        self.publisher: Optional[WeightPublisher] = None
        self.async_publisher: Optional[AsyncPublisher] = None
        self.last_result: Optional[PublishResult] = None
        self.results: list[PublishResult] = []
        self.errors: list[HotweightsError] = []
        self._last_step: Optional[int] = None
        self._unlogged: dict[str, float] = {}
        self._init_opt_policy(opt_policy, opt_attenuation)

    # ---------------------------------------------------------------- rank handling
    @staticmethod
    def _is_main(state: Any) -> bool:
        return bool(getattr(state, "is_world_process_zero", True))

    def _ensure_publisher(self, model: Any = None) -> WeightPublisher:
        if self.publisher is None:
            self.publisher = WeightPublisher(self.endpoint, config=self.config)
            if self.vllm is not None:
                from .vllm.attach import attach_vllm

                # The model decides the form: a PeftModel with peft_mode=adapter is served as LoRA adapters.
                self.vllm = attach_vllm(self.publisher, self.vllm, self.config, model=model)
        return self.publisher

    def tensors(self, model: Any, state: Any) -> Optional[Iterable]:
        """What to publish from ``model``. Runs on every rank; returns None on ranks that don't send.

        Sharded models (DeepSpeed ZeRO-3) need every rank to take part in gathering, so this is the
        hook the DeepSpeed integration extends; for ordinary models only the main rank returns them.
        """
        from .gather import publish_source

        return publish_source(model, is_main=self._is_main(state), bucket_bytes=self.config.bucket_bytes,
                              peft_mode=self.config.peft_mode)

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply_opt_policy_on_resume(args, state, kwargs.get("model"), kwargs.get("optimizer"))
        if self._is_main(state):
            self._ensure_publisher(kwargs.get("model"))  # receivers can connect before the first step

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and state.global_step % self.every_n_steps == 0:
            self._push(model, state)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        try:
            final_skipped = (self.async_publisher is not None
                             and self.async_publisher.last_submitted_step != state.global_step)
            if model is not None and (self._last_step != state.global_step or final_skipped):
                self._push(model, state, final=True)
            if self.async_publisher is not None:
                self._guard(state.global_step, self.async_publisher.flush)
                self._collect_async()
        finally:
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
    def _push(self, model: Any, state: Any, final: bool = False) -> None:
        step = int(state.global_step)
        self._last_step = step
        if self.config.async_publish:
            self._push_async(model, state, step, final)
            return
        source = None
        try:
            source = self.tensors(model, state)
            if source is None:
                return
            result = self._ensure_publisher(model).publish(source, step=step)
        except HotweightsError as exc:
            self.errors.append(exc)
            if self.config.on_error == "raise":
                raise
            log.warning("weight push at step %d failed (on_error=warn, training continues): %s", step, exc)
            return
        finally:
            finish(source)  # a ZeRO-3 gather stopped by an error still completes on every rank
        self._record(result)

    def _push_async(self, model: Any, state: Any, step: int, final: bool) -> None:
        def submit() -> None:
            source = self.tensors(model, state)
            if source is None:
                return
            try:
                if self.async_publisher is None:
                    self.async_publisher = AsyncPublisher(self._ensure_publisher(model), config=self.config)
                self.async_publisher.submit(source, step=step, force=final)  # snapshots (gathers) now
            finally:
                finish(source)  # a ZeRO-3 gather stopped by an error still completes on every rank

        self._guard(step, submit)
        self._collect_async()

    def _guard(self, step: int, fn: Any) -> None:
        try:
            fn()
        except HotweightsError as exc:
            self.errors.append(exc)
            if self.config.on_error == "raise":
                raise
            log.warning("weight push at step %d failed (on_error=warn, training continues): %s", step, exc)

    def _collect_async(self) -> None:
        apub = self.async_publisher
        if apub is None:
            return
        for result in apub.results[len(self.results):]:
            self._record(result)
        known = {id(e) for e in self.errors}
        self.errors.extend(e for e in apub.errors if id(e) not in known and isinstance(e, HotweightsError))

    def _record(self, result: PublishResult) -> None:
        self.last_result = result
        self.results.append(result)
        self._unlogged = {"hotweights/version": result.version, "hotweights/sync_seconds": result.seconds,
                          "hotweights/bytes": result.bytes_sent}

    def close(self) -> None:
        if self.async_publisher is not None:
            try:
                self.async_publisher.close()
            finally:
                self.async_publisher = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    # ---------------------------------------------------------------- optimizer state on resume
    def _init_opt_policy(self, policy: Optional[str], attenuation: Optional[float]) -> None:
        from ..optim import validate_policy

        self.opt_policy, self.opt_attenuation = validate_policy(
            policy if policy is not None else self.config.opt_policy,
            attenuation if attenuation is not None else self.config.opt_attenuation)
        self.opt_report = None
        self.resume_checkpoint: Optional[str] = None
        """Checkpoint folder a resume reads the sidecar from; by default OUTPUT_DIR/checkpoint-STEP."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Write the weights sidecar into the checkpoint the Trainer just saved (all ranks take part)."""
        from ..optim import write_sidecar

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if model is None:
            return
        if self._is_main(state) and not os.path.isdir(folder):
            log.warning("checkpoint folder %s not found after save; no hotweights sidecar written", folder)
            return
        version = self.last_result.version if self.last_result is not None else None
        try:
            write_sidecar(folder, model, step=int(state.global_step), version=version,
                          is_main=self._is_main(state))
        except HotweightsError as exc:
            self._opt_error(exc, f"writing the sidecar of {folder}")

    def _apply_opt_policy_on_resume(self, args: Any, state: Any, model: Any, optimizer: Any) -> None:
        """On a resumed run (the Trainer has loaded the optimizer by now), apply the policy once to the
        parameters whose bytes differ from the checkpoint's sidecar; log the report."""
        from ..optim import SIDECAR_NAME, apply_on_resume

        if self.opt_report is not None or not state.global_step or model is None or optimizer is None:
            return
        candidates = [self.resume_checkpoint, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        folder = next((c for c in candidates
                       if isinstance(c, str) and os.path.isfile(os.path.join(c, SIDECAR_NAME))), None)
        if folder is None:
            log.warning("resumed at step %d but found no hotweights sidecar (looked in %s); optimizer state "
                        "left as loaded. Set callback.resume_checkpoint to the folder resumed from.",
                        state.global_step, ", ".join(str(c) for c in candidates if c))
            return
        try:
            self.opt_report = apply_on_resume(model, optimizer, folder, policy=self.opt_policy,
                                              attenuation=self.opt_attenuation, config=self.config)
        except HotweightsError as exc:
            self._opt_error(exc, f"applying the optimizer policy on resume from {folder}")
            return
        if self._is_main(state):
            log.info("resume from %s: %s", folder, self.opt_report.summary())
        history = getattr(state, "log_history", None)
        if history is not None:
            history.append({**self.opt_report.log_entries(), "step": state.global_step})

    def _opt_error(self, exc: HotweightsError, what: str) -> None:
        self.errors.append(exc)
        if self.config.on_error == "raise":
            raise exc
        log.warning("%s failed (on_error=warn, training continues): %s", what, exc)

