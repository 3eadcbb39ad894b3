"""Shared by the recipes (imported from the recipe's own directory; not part of the library).

A tiny GPT-2 built from a config (no downloads), deterministic batches, the inference receiver
process, and the end-of-training check: the trainer writes a fingerprint of its final weights --
taken from gathered full tensors -- and the receiver compares its own weights with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
MODEL_CONFIG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                    eos_token_id=0)


def build_model(seed: int = 0):
    """The recipes' model. The receiver builds it with another seed, so only a sync can make them equal."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**MODEL_CONFIG))


def make_batches(n: int, batch_size: int, seq_len: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (batch_size, seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def say(line: str) -> None:
    """Print one line in a single write: the trainer and the inference process share a terminal."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def default_endpoint() -> str:
    return f"shm://recipe-{os.getpid()}"


def start_receiver(endpoint: str, expect: Path, timeout_s: float) -> subprocess.Popen:
    """The inference side, in its own process (as it would be on a serving node)."""
    return subprocess.Popen([sys.executable, str(HERE / "inference_receiver.py"), "--endpoint", endpoint,
                             "--expect", str(expect), "--timeout", str(timeout_s)])


def final_digests(model: Any) -> Optional[dict[str, str]]:
    """Per-tensor fingerprints of the trainer's final weights, on rank 0 (None elsewhere).

    Under ZeRO-3 every rank gathers the whole model here -- fine for a check at the end of a small
    run, and independent of the bucketed gathers the sync itself uses.
    """
    from hotweights_trainer.source import unwrap_model
    from hotweights_trainer.verify import weights_digest

    model = unwrap_model(model)
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return weights_digest(model) if rank() == 0 else None
    return weights_digest(model) if rank() == 0 else None


def write_expectation(path: Path, *, version: int, step: Optional[int], digests: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "step": step, "digests": digests}))
    os.replace(tmp, path)  # the receiver never reads a half-written file


def wait_receiver(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        print(f"inference receiver did not finish within {timeout_s:.0f}s", file=sys.stderr)
        return 124


def report_and_check(sync: Any, summary: dict[str, Any], *, digests: dict[str, str], expect: Path,
                     receiver: subprocess.Popen, timeout_s: float) -> int:
    """Rank 0 after training: print the summary with the pushes, tell the inference process which
    final weights to expect, and return its verdict (0 only when they are bit-exact)."""
    results = sync.results
    summary = {**summary, "pushes": len(results), "pushed_steps": [r.step for r in results],
               "versions": [r.version for r in results]}
    say(f"trainer: {json.dumps(summary)}")
    last = sync.last_result
    write_expectation(expect, version=last.version, step=last.step, digests=digests)
    return wait_receiver(receiver, timeout_s)


def exit_launched(code: int) -> None:
    """End a launched rank once it has reported: flush and leave without interpreter teardown.

    Even after ``destroy_process_group``, torch's gloo and DeepSpeed's CPU threads are sometimes
    destroyed at exit while still joinable ("terminate called without an active exception"), and
    the launcher then reports the whole run as failed although every rank finished its work.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown_distributed() -> None:
    """Leave together and tear the process group down before exit.

    A rank that exits while the gloo process group is alive can abort in C++ teardown
    ("terminate called without an active exception") and fail the whole launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
