"""Every code block of the README runs as written.

Python blocks run as they are, with a fixture filling the names the README says are the reader's
own (``model``, ``args``, ``ds``, ``data``, ``opt``, ``steps``, ``train_step``, ``serving``,
``generate``) and a fresh endpoint name in place of ``shm://policy``. A block that publishes runs
against a receiver that must end bit-exact with the block's final weights; a block that receives
runs against a publisher whose version it must end up holding. Shell blocks are listed below with
the reason they do not run here; any other block fails the test.
"""

from __future__ import annotations

import re
import threading
import uuid

import pytest
import torch

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.verify import weights_digest
from tests.conftest import ROOT, require

README = ROOT / "README.md"
NOT_RUN = {
    "make demo   # creates .venv, installs, runs the main job on the embedded shm:// transport\n"
    "make test   # creates .venv, installs every test extra, runs the test suite\n":
        "creates a virtual environment and installs into it; `make test` is this suite itself",
}
MODEL = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def python_blocks() -> list[str]:
    return [code for lang, code in blocks() if lang == "python"]


def test_every_block_is_run_or_explained():
    others = [(lang, code) for lang, code in blocks() if lang != "python"]
    assert [code for _, code in others] == list(NOT_RUN), "a README block neither runs here nor says why not"
    assert all(lang == "bash" for lang, _ in others)
    # The front page keeps its shape: the two commands exactly, the vLLM pointer, the linked docs.
    text = README.read_text()
    assert "## Two commands\n\n```bash\nmake demo" in text
    vllm = re.search(r"^## vLLM\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert vllm and "(docs/VLLM.md)" in vllm.group(1) and len(vllm.group(1).splitlines()) < 15
    assert "load_weights" not in text
    for link in re.findall(r"\]\((docs/[A-Z_]+\.md)\)", text):
        assert (ROOT / link).exists(), f"README links a missing {link}"
    assert len(text.splitlines()) < 200, "the README is the front page: deep sections go to docs/"


def _model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**MODEL))


def _placeholders(model, tmp_path) -> dict:
    """The reader's own objects the README blocks use, for a tiny GPT-2."""
    from transformers import TrainingArguments

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (3, 4, 16), generator=g)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step() -> None:
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad()

    class Serving:  # true for a few rounds of the serving loop
        rounds = 3

        def __bool__(self) -> bool:
            self.rounds -= 1
            return self.rounds >= 0

    return {
        "model": model, "opt": opt, "data": batches, "steps": 3, "train_step": train_step,
        "ds": [{"input_ids": row, "labels": row} for b in batches for row in b["input_ids"]],
        "args": TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=2,
                                  per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True),
        "serving": Serving(), "generate": lambda m: m(input_ids=batches[0]["input_ids"][:1]),
    }


@pytest.mark.parametrize("index", range(len(python_blocks())), ids=lambda i: f"python-block-{i}")
def test_python_block_runs(index, tmp_path):
    require("hf")
    endpoint = f"shm://readme-{uuid.uuid4().hex[:12]}"
    code = python_blocks()[index]
    assert code.count("shm://policy") == 1, "each block names the endpoint once"
    code = code.replace("shm://policy", endpoint)
    model = _model(0)
    scope = _placeholders(model, tmp_path)
    cfg = SyncConfig(timeout_s=60, linger_s=0)
    if "WeightReceiver(" in code:
        source = _model(7)  # what the block must end up serving
        with WeightPublisher(endpoint, config=cfg) as pub:
            def publish() -> None:
                pub.wait_for_receivers(1)
                pub.publish(source)

            thread = threading.Thread(target=publish)
            thread.start()
            exec(compile(code, f"README.md python block {index}", "exec"), scope)
            thread.join(60)
        assert weights_digest(model) == weights_digest(source)
    else:
        follower = _model(7)
        with WeightReceiver(endpoint, model=follower, config=cfg) as rx:
            before = weights_digest(model)
            exec(compile(code, f"README.md python block {index}", "exec"), scope)
            rx.poll()  # publish() returned after every receiver held the version: it is pending here
            assert rx.version >= 1
        assert weights_digest(follower) == weights_digest(model) != before
