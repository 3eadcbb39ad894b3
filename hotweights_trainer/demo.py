"""The main job on the embedded default: HF Trainer + HotweightsCallback -> an inference process.

The trainer trains a tiny character-level GPT-2 built from a config (no downloads). A separate
inference process holds its own, differently initialised model, applies each version, generates a
short sample and reports a fingerprint of its weights. For every step the demo reports: step,
version, MB sent, sync ms, apply (pause) ms, and whether the receiver's weights are bit-exact with
the trainer's. It fails on any mismatch.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue as queue_mod
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .config import SyncConfig
from .errors import HotweightsError, SyncTimeoutError

log = logging.getLogger(__name__)

TEXT = ("hotweights moves weights from the trainer to inference, whole or not at all. "
        "every version is verified, bit for bit, before it goes live. ")
PROMPT = "hotweights "


def _vocab() -> list[str]:
    return sorted(set(TEXT))


def _model_config(vocab_size: int) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _build_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**_model_config(len(_vocab()))))


def _sample(model, n_tokens: int = 24) -> str:
    vocab = _vocab()
    ids = torch.tensor([[vocab.index(c) for c in PROMPT]])
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return "".join(vocab[i] for i in ids[0].tolist())


def inference_worker(endpoint: str, final_step: int, timeout_s: float, out: "mp.Queue") -> None:
    """Runs in its own process: follow the publisher, report each applied version."""
    from .receiver import WeightReceiver
    from .verify import combined_digest, weights_digest

    try:
        model = _build_model(seed=1234).eval()
        with WeightReceiver(endpoint, model=model, config=SyncConfig(timeout_s=timeout_s)) as rx:
            out.put({"event": "ready"})
            version = 0
            while True:
                version = rx.wait_for_version(version + 1)
                out.put({"event": "applied", "version": version, "step": rx.step,
                         "apply_ms": rx.last_apply_seconds * 1e3,
                         "digest": combined_digest(weights_digest(model)), "sample": _sample(model)})
                if rx.step is not None and rx.step >= final_step:
                    break
    except HotweightsError as exc:
        out.put({"event": "error", "error": f"{type(exc).__name__}: {exc}"})


@dataclass
class DemoRow:
    step: int
    version: int
    mb_sent: float
    sync_ms: float
    apply_ms: float
    bit_exact: bool
    sample: str


@dataclass
class DemoSummary:
    rows: list[DemoRow] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.rows) and all(r.bit_exact for r in self.rows)


def run_demo(*, steps: int = 10, endpoint: Optional[str] = None, timeout_s: float = 60.0,
             emit: Callable[[DemoRow], None] = lambda row: None) -> DemoSummary:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from .integrations.hf_trainer import HotweightsCallback
    from .verify import combined_digest, weights_digest

    t_start = time.perf_counter()
    endpoint = endpoint or f"shm://demo-{mp.current_process().pid}"
    summary = DemoSummary()
    ctx = mp.get_context("spawn")
    reports: mp.Queue = ctx.Queue()
    worker = ctx.Process(target=inference_worker, args=(endpoint, steps, timeout_s, reports), daemon=True)
    worker.start()

    def next_report() -> dict[str, Any]:
        try:
            msg = reports.get(timeout=timeout_s)
        except queue_mod.Empty:
            raise SyncTimeoutError(f"inference process sent nothing for {timeout_s:.0f}s") from None
        if msg["event"] == "error":
            raise HotweightsError(f"inference process failed: {msg['error']}")
        return msg

    vocab = _vocab()
    data = torch.tensor([vocab.index(c) for c in TEXT * 4])
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - 33, (steps * 16,), generator=gen)
    dataset = [{"input_ids": data[s:s + 32], "labels": data[s:s + 32]} for s in starts.tolist()]

    sync = HotweightsCallback(endpoint, config=SyncConfig(timeout_s=timeout_s))

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            next_report()  # the receiver exists
            sync.publisher.wait_for_receivers(1, timeout=timeout_s)

        def on_step_end(self, args, state, control, model=None, **kw):
            res = sync.last_result
            if res is None or res.step != state.global_step:
                return
            expected = combined_digest(weights_digest(model))
            got = next_report()
            while got["version"] < res.version:
                got = next_report()
            row = DemoRow(state.global_step, res.version, res.bytes_sent / 1e6, res.seconds * 1e3,
                          got["apply_ms"], got["digest"] == expected, got["sample"])
            summary.rows.append(row)
            emit(row)

    model = _build_model(seed=0)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="hotweights-demo-"), use_cpu=True,
                             report_to=[], max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, logging_strategy="no", save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[sync, Report()])
    trainer.remove_callback(PrinterCallback)  # our rows are the output; keep stdout clean for --json
    try:
        trainer.train()
    except HotweightsError as exc:
        summary.error = f"{type(exc).__name__}: {exc}"
    finally:
        sync.close()
        worker.join(timeout=timeout_s)
        if worker.is_alive():
            worker.terminate()
    summary.seconds = time.perf_counter() - t_start
    return summary
