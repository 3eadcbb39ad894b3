"""Trainer half of recipes/vllm_serve.sh: HF Trainer + HotweightsCallback(vllm=URL of a vLLM server).

Teaches the tiny Llama one sentence. After every optimizer step the callback publishes the weights
and has the server load them (one /update_weights call per version); this script then asks the
server for a greedy completion of the sentence's start, so you watch the served model learn.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import requests
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llama import load_hf  # noqa: E402

from hotweights_trainer import HotweightsCallback  # noqa: E402

SENTENCE = "the quick brown fox jumps over the lazy dog."
PROMPT = "the quick"


def wait_healthy(url: str, log_file: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    tail = Path(log_file).read_text()[-3000:] if log_file and Path(log_file).exists() else ""
    sys.exit(f"vLLM server at {url} not healthy within {timeout_s:.0f}s\n{tail}")


def complete(url: str, model: str) -> str:
    r = requests.post(f"{url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


class ShowCompletion(TrainerCallback):
    """After the hotweights callback has pushed a step, ask the server what it generates now."""

    def __init__(self, url: str, model: str, sync: HotweightsCallback):
        self.url, self.model, self.sync = url, model, sync
        self.rows: list[tuple[int, int, str]] = []

    def on_step_end(self, args, state, control, **kwargs):
        result = self.sync.last_result
        text = complete(self.url, self.model)
        self.rows.append((state.global_step, result.version, text))
        print(f"step {state.global_step:>2}  version {result.version:>2}  {result.bytes_sent / 1e6:6.2f} MB  "
              f"sync {result.seconds * 1e3:6.1f} ms  vLLM load {self.sync.vllm.last_seconds * 1e3:6.1f} ms  "
              f"{PROMPT!r} -> {text!r}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--endpoint", default="shm://policy")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--server-log", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    wait_healthy(args.url, args.server_log, 300)
    before = complete(args.url, args.model)
    print(f"before training: {PROMPT!r} -> {before!r}", flush=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tok(SENTENCE)["input_ids"])
    rows = [{"input_ids": ids, "labels": ids} for _ in range(64)]
    model = load_hf(args.model)
    sync = HotweightsCallback(args.endpoint, vllm=args.url)
    show = ShowCompletion(args.url, args.model, sync)
    targs = TrainingArguments(output_dir=str(Path(args.model).parent / "out"), use_cpu=True, report_to=[],
                              max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-2,
                              save_strategy="no", disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=targs, train_dataset=rows, callbacks=[sync, show]).train()

    served = requests.get(f"{args.url}/weight_info", timeout=30).json()["weight_version"]
    last = sync.results[-1].version
    texts = {text for _, _, text in show.rows}
    print(f"server weight_version {served}, trainer's last version {last}, "
          f"{len(texts)} distinct completion(s)", flush=True)
    if served != str(last):
        sys.exit(f"server reports weight_version {served!r}, expected {last}")
    if texts == {before}:
        sys.exit("the served completion never changed: the updates did not reach the server")


if __name__ == "__main__":
    main()
