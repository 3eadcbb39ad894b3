"""``HotweightsCallback``: publish weights from a Hugging Face ``Trainer`` after optimizer steps.

Add it with ``Trainer(..., callbacks=[HotweightsCallback("shm://policy")])``. Every rank may run it.
It pushes through the same :class:`~hotweights_trainer.integrations.pusher.StepPusher` as Accelerate
and DeepSpeed, so the rank that sends is the same everywhere: ``torch.distributed`` rank 0 (not the
Trainer's ``is_world_process_zero``; the pusher's docstring says why). It publishes in ``on_step_end``
(after the optimizer step, so never inside gradient accumulation) every ``every_n_steps`` global
steps, and the final weights in ``on_train_end``. ``hotweights/version``, ``hotweights/sync_seconds`` and
``hotweights/bytes`` are added to the Trainer's logs.

Start and end of a run: with ``min_receivers`` (``HOTWEIGHTS_MIN_RECEIVERS``) the first push waits
for that many inference processes, so a run shorter than their start-up does not publish to nobody;
closing the publisher in ``on_train_end`` keeps serving the final version (``linger_s``) to
receivers that do not have it yet.

Resumed runs: each checkpoint the Trainer saves gets a weights sidecar (``on_save``; not for a ZeRO-3
model under ``opt_policy="preserve"``, which needs none). When training
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
from typing import Any, Optional

from ..async_publisher import AsyncPublisher
from ..config import SyncConfig
from ..errors import HotweightsError, missing_dependency
from ..publisher import PublishResult, WeightPublisher
from .pusher import StepPusher, check_every_n, global_rank

try:
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - exercised only without the hf extra
    raise missing_dependency("transformers", "hf") from _exc

log = logging.getLogger(__name__)


class HotweightsCallback(TrainerCallback):
    def __init__(self, endpoint: str, *, every_n_steps: int = 1, config: Optional[SyncConfig] = None,
                 close_on_train_end: bool = True, opt_policy: Optional[str] = None,
                 opt_attenuation: Optional[float] = None, vllm: Any = None):
        self.endpoint = endpoint
        self.every_n_steps = check_every_n(every_n_steps)
        self.config = config if config is not None else SyncConfig.from_env()
        self.close_on_train_end = close_on_train_end
        self.vllm = vllm
        """An ``LLM``, a ``vllm serve`` URL or a ``VLLMUpdater`` that loads every published version."""
        self.pusher: Optional[StepPusher] = None
        """The push path shared with Accelerate and DeepSpeed; created in ``on_train_begin``."""
        self.results: list[PublishResult] = []
        self.errors: list[HotweightsError] = []
        self._logged = 0
        self._unlogged: dict[str, float] = {}
        self._init_opt_policy(opt_policy, opt_attenuation)

    # ---------------------------------------------------------------- the pusher
    @property
    def publisher(self) -> Optional[WeightPublisher]:
        """The main rank's publisher while training runs (None elsewhere)."""
        return self.pusher.publisher if self.pusher is not None else None

    @property
    def async_publisher(self) -> Optional[AsyncPublisher]:
        return self.pusher.async_publisher if self.pusher is not None else None

    @property
    def last_result(self) -> Optional[PublishResult]:
        return self.results[-1] if self.results else None

    def _ensure_pusher(self, model: Any) -> StepPusher:
        if self.pusher is None or self.pusher.closed:
            # Every push of every run of this callback lands in the same results and errors.
            self.pusher = StepPusher(self.endpoint, every_n_steps=self.every_n_steps, config=self.config,
                                     vllm=self.vllm, start=False)
            self.pusher.results, self.pusher.errors = self.results, self.errors
        # The model decides the form: a PeftModel with peft_mode=adapter is served as LoRA adapters.
        self.pusher.start(model)
        if self.pusher.vllm is not None:
            self.vllm = self.pusher.vllm
        return self.pusher

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply_opt_policy_on_resume(args, state, kwargs.get("model"), kwargs.get("optimizer"))
        self._ensure_pusher(kwargs.get("model"))  # receivers can connect before the first step

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._ensure_pusher(model).step_reached(model, int(state.global_step))
            self._note_results()

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        try:
            if model is not None:
                self._ensure_pusher(model).push_final(model, step=int(state.global_step))
            elif self.pusher is not None:
                self.pusher.flush()
        finally:
            self._note_results()
            if self.close_on_train_end:
                self.close()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        self._note_results()
        if logs is None or not self._unlogged:
            return
        logs.update(self._unlogged)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(self._unlogged)
        self._unlogged = {}

    def _note_results(self) -> None:
        """Queue the newest finished push (asynchronous ones finish later) for the next log line."""
        if len(self.results) > self._logged:
            self._logged = len(self.results)
            result = self.results[-1]
            self._unlogged = {"hotweights/version": result.version, "hotweights/sync_seconds": result.seconds,
                              "hotweights/bytes": result.bytes_sent}

    def close(self) -> None:
        if self.pusher is not None:
            try:
                self.pusher.close()
            finally:
                self._note_results()

    # ---------------------------------------------------------------- optimizer state on resume
    def _init_opt_policy(self, policy: Optional[str], attenuation: Optional[float]) -> None:
        from ..optim import validate_policy

        self.opt_policy, self.opt_attenuation = validate_policy(
            policy if policy is not None else self.config.opt_policy,
            attenuation if attenuation is not None else self.config.opt_attenuation)
        self.opt_report = None
        self._said_no_sidecar = False
        self.resume_checkpoint: Optional[str] = None
        """Checkpoint folder a resume reads the sidecar from; by default OUTPUT_DIR/checkpoint-STEP."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Write the weights sidecar into the checkpoint the Trainer just saved (all ranks take part).

        Not under ZeRO-3 with ``opt_policy="preserve"``: a resume then changes no optimizer state, so the
        sidecar would only cost a gather of every parameter on every save (said once in the log)."""
        from ..optim import write_sidecar
        from ..optim.sidecar import sidecar_needed

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if model is None:
            return
        if not sidecar_needed(model, self.opt_policy):
            if not self._said_no_sidecar:
                self._said_no_sidecar = True
                log.info("opt_policy=preserve keeps every optimizer state on resume, so checkpoints of this "
                         "ZeRO-3 model get no hotweights sidecar (it would gather every parameter on each "
                         "save); choose opt_policy reset or attenuate to have one")
            return
        main = global_rank() == 0
        if main and not os.path.isdir(folder):
            log.warning("checkpoint folder %s not found after save; no hotweights sidecar written", folder)
            return
        version = self.last_result.version if self.last_result is not None else None
        try:
            write_sidecar(folder, model, step=int(state.global_step), version=version, is_main=main)
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
        if folder is None and self.opt_policy == "preserve":
            log.info("resumed at step %d without a hotweights sidecar; opt_policy=preserve keeps the "
                     "optimizer state as loaded", state.global_step)
            return
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
        if global_rank() == 0:
            log.info("resume from %s: %s", folder, self.opt_report.summary())
        history = getattr(state, "log_history", None)
        if history is not None:
            history.append({**self.opt_report.log_entries(), "step": state.global_step})

    def _opt_error(self, exc: HotweightsError, what: str) -> None:
        self.errors.append(exc)
        if self.config.on_error == "raise":
            raise exc
        log.warning("%s failed (on_error=warn, training continues): %s", what, exc)

