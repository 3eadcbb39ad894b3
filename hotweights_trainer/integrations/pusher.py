"""``StepPusher``: the one push path of every training-loop integration.

``HotweightsCallback`` (HF Trainer), ``AccelerateSync`` and DeepSpeed's ``attach`` all push through
it, so the three behave alike: every rank takes part in each push (ZeRO-3 gathers are collective)
while only the global main rank owns a :class:`~hotweights_trainer.publisher.WeightPublisher` and
sends; ``SyncConfig.async_publish`` snapshots the weights at the step boundary and sends them from
an :class:`~hotweights_trainer.async_publisher.AsyncPublisher` while the next step trains; errors
follow ``config.on_error``.

**Which rank sends.** ``torch.distributed.get_rank() == 0`` whenever a process group exists, else
this process. Launchers and wrappers disagree on what "main process" means (Accelerate driving
DeepSpeed on CPU reports process 0 on every rank, and a Trainer's ``is_world_process_zero`` follows
Accelerate), and two "main" ranks would both try to bind the endpoint; the process group is the one
thing every rank agrees on. The rank is read when the pusher starts (:meth:`StepPusher.start`),
which a Trainer callback delays to ``on_train_begin``, when the Trainer has set the group up.

**Settings that cannot take effect** are refused or warned about, never dropped in silence:
``vllm=`` with ``peft_mode="adapter"`` needs the model at start, or a ready ``VLLMUpdater`` (a
``ConfigError`` otherwise: the engine would be set up for full weights and refuse every adapter
version); ``peft_mode="adapter"``
on a model without PEFT layers sends the whole model, said once in the log.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from ..async_publisher import AsyncPublisher
from ..config import SyncConfig
from ..errors import ClosedError, ConfigError, HotweightsError
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
    """Counts optimizer steps and pushes weights every ``every_n_steps`` of them, from every rank.

    ``is_main`` overrides the rank rule above; ``model`` is what will be published, needed at start
    only by ``vllm=`` in adapter mode; ``start=False`` delays :meth:`start` to the first push.
    """

    def __init__(self, endpoint: str, *, every_n_steps: int = 1, config: Optional[SyncConfig] = None,
                 is_main: Optional[bool] = None, vllm: Any = None, model: Any = None, start: bool = True):
        self.every_n_steps = check_every_n(every_n_steps)
        self.endpoint = endpoint
        self.config = config if config is not None else SyncConfig.from_env()
        self._is_main_arg = is_main
        self.is_main: Optional[bool] = None if is_main is None else bool(is_main)
        """Whether this rank sends; None until :meth:`start`."""
        self.optimizer_steps = 0
        """Real optimizer steps seen (accumulation micro-steps and skipped steps excluded)."""
        self.results: list[PublishResult] = []
        """Every finished push on the main rank, in order (asynchronous ones once they finished)."""
        self.errors: list[HotweightsError] = []
        self.last_result: Optional[PublishResult] = None
        self.async_pushes = 0
        """Pushes handed to the background publisher (``async_publish``); skipped boundaries excluded."""
        self.publisher: Optional[WeightPublisher] = None
        self.async_publisher: Optional[AsyncPublisher] = None
        self.vllm = vllm
        """On the main rank once started, the ``VLLMUpdater`` that loads every version into a vLLM engine."""
        self._started = False
        self._closed = False
        self._last_attempted_step: Optional[int] = None  # the same on every rank: decides push_final
        self._last_sent_step: Optional[int] = None  # main rank only
        self._warned: set[str] = set()
        self._async_seen = 0  # results of the background publisher already in self.results
        if start:
            self.start(model)

    # ---------------------------------------------------------------- lifecycle
    def start(self, model: Any = None) -> None:
        """Decide this rank's role and, on the main rank, create the publisher so receivers can
        connect before the first step. Idempotent; runs at the first push at the latest."""
        if self._closed:
            raise ClosedError(f"weight sync to {self.endpoint} is closed")
        if self._started:
            return
        if self.vllm is not None and self.config.peft_mode == "adapter" and model is None:
            from .vllm.updater import VLLMUpdater

            if not isinstance(self.vllm, VLLMUpdater):  # a ready updater was told its peft_model already
                raise ConfigError(
                    "vllm= with peft_mode='adapter' needs the model when the sync starts, to set the engine "
                    "up for its LoRA adapters; pass model= (or a ready VLLMUpdater(..., peft_model=model) as "
                    "vllm=, or set peft_mode='merged' to send merged weights)")
        self.is_main = global_rank() == 0 if self._is_main_arg is None else bool(self._is_main_arg)
        if self.is_main:
            publisher = WeightPublisher(self.endpoint, config=self.config)
            try:
                if self.vllm is not None:
                    from .vllm.attach import attach_vllm

                    # The model decides the form: a PeftModel with peft_mode=adapter is served as LoRA
                    # adapters.
                    self.vllm = attach_vllm(publisher, self.vllm, self.config, model=model)
                if self.config.async_publish:
                    self.async_publisher = AsyncPublisher(publisher, config=self.config)
            except BaseException:  # cleanup only: a half-started sync must not keep the endpoint bound
                publisher.close(linger=False)
                raise
            self.publisher = publisher
        self._started = True

    def wait_for_receivers(self, n: int, timeout: Optional[float] = None) -> int:
        """On the main rank, block until ``n`` receivers are connected; elsewhere return 0 at once."""
        if self.publisher is None:
            return 0
        return self.publisher.wait_for_receivers(n, timeout)

    # ---------------------------------------------------------------- steps
    def optimizer_stepped(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        """Record one real optimizer step; push when it is the ``every_n_steps``-th. Call on every rank."""
        self.optimizer_steps += 1
        if self.optimizer_steps % self.every_n_steps:
            return None
        return self.push(model, step=self.optimizer_steps if step is None else step)

    def step_reached(self, model: Any, step: int) -> Optional[PublishResult]:
        """The loop's own step counter reached ``step`` (a Trainer's ``global_step``, which a resumed
        run starts above 0); push when it is a multiple of ``every_n_steps``. Call on every rank."""
        self.optimizer_steps = int(step)
        if self.optimizer_steps % self.every_n_steps:
            return None
        return self.push(model, step=self.optimizer_steps)

    def push(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        """Publish ``model`` now (every rank must call this together).

        Returns the result on the main rank; None elsewhere, and under ``async_publish``, where the
        push finishes in the background (see :attr:`results`).
        """
        return self._push(model, step)

    def _push(self, model: Any, step: Optional[int], final: bool = False) -> Optional[PublishResult]:
        # final: sends unless this step is already out, waiting for a free slot even under
        # staleness_policy=skip
        if self._closed:
            raise ClosedError(f"weight sync to {self.endpoint} is closed")
        self.start(model)
        step = self.optimizer_steps if step is None else int(step)
        self._last_attempted_step = step
        self._warn_adapter_without_peft(model)
        source = None
        result: Optional[PublishResult] = None
        try:
            source = publish_source(model, is_main=bool(self.is_main), bucket_bytes=self.config.bucket_bytes,
                                    peft_mode=self.config.peft_mode)
            if source is None or self.publisher is None:
                return None
            if final and self._last_sent_step == step:
                return None  # already sent; the other ranks' gathers complete in finish() below
            if self.async_publisher is not None:
                if self.async_publisher.submit(source, step=step, force=final):  # snapshots (gathers) now
                    self._last_sent_step = step
                    self.async_pushes += 1
                return None
            result = self.publisher.publish(source, step=step)
            self._last_sent_step = step
        except HotweightsError as exc:
            self._failed(exc, step)
            return None
        finally:
            finish(source)  # completes a ZeRO-3 gather stopped early, so no rank is left waiting
            self._collect_async()
        self._record(result)
        return result

    def push_final(self, model: Any, step: Optional[int] = None) -> Optional[PublishResult]:
        """Push unless the last push already carried these weights (e.g. at the end of training), then
        wait for queued asynchronous pushes. Returns, on the main rank, the result that carries step
        ``step`` when this call pushed (None when an earlier push already had these weights)."""
        step = self.optimizer_steps if step is None else int(step)
        # Every rank must come to the same answer (ZeRO-3 gathers are collective), so only facts all
        # ranks share decide: a boundary that staleness_policy=skip dropped is known to the main rank
        # alone, hence under that policy every rank enters push() and the main rank sends if needed.
        maybe_skipped = self.config.async_publish and self.config.staleness_policy == "skip"
        pushed = self._last_attempted_step != step or maybe_skipped
        if pushed:
            self._push(model, step, final=True)
        self.flush()
        last = self.last_result
        return last if pushed and last is not None and last.step == step else None

    def flush(self) -> None:
        """Wait for queued asynchronous pushes; their errors follow ``on_error``. No-op otherwise."""
        if self.async_publisher is not None:
            self._guard(self._last_attempted_step, self.async_publisher.flush)

    def close(self) -> None:
        """Finish queued pushes, then close the publisher (which serves its last version to receivers
        that do not have it yet, up to ``linger_s``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.async_publisher is not None:
                self._guard(self._last_attempted_step, self.async_publisher.close)
        finally:
            self.async_publisher = None
            if self.publisher is not None:
                self.publisher.close()
                self.publisher = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "StepPusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers
    def _guard(self, step: Optional[int], fn: Callable[[], Any]) -> None:
        try:
            fn()
        except HotweightsError as exc:
            self._failed(exc, step)
        finally:
            self._collect_async()

    def _failed(self, exc: HotweightsError, step: Optional[int]) -> None:
        if all(e is not exc for e in self.errors):
            self.errors.append(exc)
        if self.config.on_error == "raise":
            raise exc
        log.warning("weight push at step %s failed (on_error=warn, training continues): %s", step, exc)

    def _collect_async(self) -> None:
        apub = self.async_publisher
        if apub is None:
            return
        for result in apub.results[self._async_seen:]:
            self._record(result)
        self._async_seen = len(apub.results)
        known = {id(e) for e in self.errors}
        self.errors.extend(e for e in apub.errors if id(e) not in known and isinstance(e, HotweightsError))

    def _record(self, result: Optional[PublishResult]) -> None:
        if result is not None:
            self.last_result = result
            self.results.append(result)

    def _warn_adapter_without_peft(self, model: Any) -> None:
        if self.config.peft_mode != "adapter" or "adapter" in self._warned:
            return
        from ..peft_sync import has_peft_layers

        if not has_peft_layers(model):
            self._warned.add("adapter")
            log.warning("peft_mode='adapter' has no effect on %s: the model holds no PEFT adapters, so every "
                        "tensor is sent", type(model).__name__)
