"""Adapter mode into vLLM: each adapter-form version becomes a vLLM LoRA adapter, base weights untouched.

One real in-process vLLM engine (CPU build, ``enable_lora=True``) for the module, a tiny Llama made
locally, real peft adapters trained by the HF Trainer; the reference is peft's own
``merge_and_unload()`` of a copy of the trained model.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, child_env, free_port, in_process_llm, require

sys.path.insert(0, str(ROOT / "recipes"))

PROMPT = "hotweights moves weights from the trainer"
MAX_RANK = 8
pytestmark = pytest.mark.slow  # a vLLM engine and a vLLM server for the module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require("vllm")
    require("peft")
    from tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def llm(model_dir):
    with in_process_llm(model_dir, max_model_len=64, enable_lora=True, max_lora_rank=MAX_RANK,
                        max_loras=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """vLLM's OpenAI server (its own processes) with the backend, LoRA and runtime adapter loading."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = child_env(VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "64",
           "--enforce-eager", "--kv-cache-memory-bytes", str(16 << 20), "--enable-lora", "--max-lora-rank",
           str(MAX_RANK), "--max-loras", "2", "--weight-transfer-config", '{"backend": "hotweights"}']
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not start (rc {proc.poll()}):\n{log.read_text()[-4000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def fresh_endpoint() -> str:
    return f"shm://vllm-lora-{uuid.uuid4().hex[:10]}"


def lora_model(model_dir, r: int = 8, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from tiny_llama import load_hf

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return get_peft_model(load_hf(model_dir), config)


def nudge(model, seed: int) -> None:
    """Make the adapter non-trivial without training (lora_B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def base_checksums(llm) -> dict:
    out: dict = {}
    for worker in llm.llm_engine.collective_rpc("compute_weight_checksums"):
        out.update({k: v for k, v in worker.items() if "lora" not in k})
    return out


def vllm_run(llm, lora_request) -> tuple[list[int], list[float], list[int]]:
    """Greedy tokens, prompt logprobs and prompt ids from the engine with ``lora_request``."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate([PROMPT], params, lora_request=lora_request, use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    return list(out.outputs[0].token_ids), logprobs, ids


def hf_run(model, ids: list[int], n: int = 8) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
        prompt = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        seq = list(ids)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):], prompt


def adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad)


def test_trainer_adapter_mode_serves_the_merged_model_and_leaves_base_weights(llm, model_dir, tmp_path):
    """HF Trainer + HotweightsCallback(vllm=llm, peft_mode=adapter): each step is a LoRA adapter in vLLM
    that generates what peft's merge_and_unload() of the trained model generates."""
    from transformers import Trainer, TrainingArguments

    from hotweights_trainer import HotweightsCallback, SyncConfig

    before = base_checksums(llm)
    base_tokens, base_logprobs, _ = vllm_run(llm, None)
    model = lora_model(model_dir)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 300, (12, 16), generator=g)]
    config = SyncConfig.from_env(peft_mode="adapter", timeout_s=30)
    cb = HotweightsCallback(fresh_endpoint(), vllm=llm, config=config)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=4, learning_rate=3e-2, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb]).train()
    model.eval()

    assert [r.version for r in cb.results] == [1, 2, 3]
    request = cb.vllm.lora_request
    assert request.lora_int_id == 3 and Path(request.lora_path).name == "v3"
    assert sorted(p.name for p in Path(cb.vllm.lora_dir).iterdir()) == ["v2", "v3"]  # older ones pruned
    assert llm.llm_engine.list_loras() == {3}  # the previous adapter was removed once v3 loaded
    limit = 1.1 * adapter_bytes(model)
    assert all(r.bytes_sent <= limit for r in cb.results), [r.bytes_sent for r in cb.results]

    tokens, logprobs, ids = vllm_run(llm, request)
    merged = copy.deepcopy(model).merge_and_unload()
    want_tokens, want_logprobs = hf_run(merged, ids)
    assert tokens == want_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 1e-4
    assert max(abs(a - b) for a, b in zip(logprobs, base_logprobs)) > 1e-3  # the adapter is really applied

    assert base_checksums(llm) == before  # adapter versions never touch the base weights
    assert vllm_run(llm, None)[0] == base_tokens


def test_refused_versions_and_engines_keep_the_served_adapter(llm, model_dir):
    """A version whose shapes do not fit the declared LoRA config, and an init the engine cannot serve,
    are refused with typed errors; the adapter served before keeps being served."""
    from hotweights_trainer import SyncConfig, WeightPublisher
    from hotweights_trainer.errors import ConfigError, ManifestMismatchError
    from hotweights_trainer.integrations.vllm.attach import attach_vllm
    from hotweights_trainer.integrations.vllm.updater import VLLMUpdater

    config = SyncConfig.from_env(peft_mode="adapter", timeout_s=30)
    model = lora_model(model_dir)
    nudge(model, seed=1)
    ep = fresh_endpoint()
    with WeightPublisher(ep, config=config) as pub:
        updater = attach_vllm(pub, llm, config, model=model)
        pub.publish(model, step=1)
        served = updater.lora_request
        assert served.lora_int_id == 1
        good = vllm_run(llm, served)
        files = sorted(p.name for p in Path(updater.lora_dir).iterdir())

        other = lora_model(model_dir, r=4)  # same tensor names, other shapes
        nudge(other, seed=2)
        with pytest.raises(ManifestMismatchError, match="shape mismatch"):
            pub.publish(other, step=2)
        assert updater.lora_request is served
        assert sorted(p.name for p in Path(updater.lora_dir).iterdir()) == files
        assert vllm_run(llm, served) == good
        # The whole adapter or nothing: vLLM loads a directory, not part of an adapter.
        partial = {k: v for k, v in model.state_dict().items()
                   if "lora_" in k and "layers.1.self_attn.v_proj" not in k}
        with pytest.raises(ManifestMismatchError, match="v_proj.*missing"):
            pub.publish(partial, step=3)
        # As for base weights, the engine reports each refusal once too, at its next update_weights.
        for problem in ("shape mismatch", "missing"):
            llm.start_weight_update()
            with pytest.raises(ManifestMismatchError, match=problem):
                llm.update_weights({"update_info": {"version": 2, "timeout_s": 5}})
        assert sorted(p.name for p in Path(updater.lora_dir).iterdir()) == files

        # A rank above the engine's max_lora_rank: refused on the trainer side, no worker touched ...
        too_big = lora_model(model_dir, r=2 * MAX_RANK)
        with pytest.raises(ConfigError, match="max_lora_rank"):
            VLLMUpdater(llm, fresh_endpoint(), config=config, peft_model=too_big)
        # ... and by the workers themselves, which keep following the endpoint they followed.
        from hotweights_trainer.integrations.vllm.lora import lora_init_info

        info = {"endpoint": fresh_endpoint(), **lora_init_info(too_big, updater.lora_dir)}
        with pytest.raises(ConfigError, match="max_lora_rank"):
            llm.init_weight_transfer_engine({"init_info": info})
        nudge(model, seed=3)
        pub.publish(model, step=4)
        assert updater.lora_request.lora_int_id > served.lora_int_id
        assert vllm_run(llm, updater.lora_request) != good


def test_adapter_mode_refusals_name_the_fix(llm, model_dir):
    """Engines without LoRA support, `vllm serve` URLs and incomplete init_info are ConfigErrors."""
    from hotweights_trainer import SyncConfig
    from hotweights_trainer.errors import ConfigError
    from hotweights_trainer.integrations.vllm.lora import check_engine
    from hotweights_trainer.integrations.vllm.options import parse_init_info
    from hotweights_trainer.integrations.vllm.updater import VLLMUpdater

    model = lora_model(model_dir)
    config = SyncConfig.from_env(peft_mode="adapter")
    options = parse_init_info({"endpoint": "shm://x", "lora_dir": "/tmp/unused",
                               "lora_config": model.peft_config["default"].to_dict()}).lora
    with pytest.raises(ConfigError, match="enable_lora=True"):
        check_engine(None, options)  # what an engine started without enable_lora has
    with pytest.raises(ConfigError, match="vllm serve"):
        VLLMUpdater("http://127.0.0.1:1", "shm://x", config=config, peft_model=model)
    with pytest.raises(ConfigError, match="lora_config"):
        parse_init_info({"endpoint": "shm://x", "lora_dir": "/tmp/unused"})
    with pytest.raises(ConfigError, match="without 'lora_dir'"):
        parse_init_info({"endpoint": "shm://x", "lora_config": {"r": 8}})
    with pytest.raises(ConfigError, match="LoRA"):
        parse_init_info({"endpoint": "shm://x", "lora_dir": "/tmp/unused",
                         "lora_config": {"peft_type": "IA3", "r": 8}})
    # merged mode (the default) with a PeftModel is unaffected: no adapter keys are sent
    merged = VLLMUpdater(llm, "shm://x", config=SyncConfig.from_env(), peft_model=model)
    assert "lora_dir" not in merged.init_info and merged.lora_request is None


def completion(url: str, model: str) -> list[int]:
    """Greedy token ids (a random tiny model's text may be all special tokens, which decode to "")."""
    import requests

    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    response = requests.post(url + "/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    return list(response.json()["choices"][0]["token_ids"])


def test_vllm_serve_loads_each_version_as_one_named_adapter(llm, server, model_dir, tmp_path):
    """A `vllm serve` URL: each version is loaded in place under one adapter name clients request."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from hotweights_trainer import SyncConfig, WeightPublisher
    from hotweights_trainer.integrations.vllm.attach import attach_vllm
    from hotweights_trainer.integrations.vllm.lora import adapter_path
    from hotweights_trainer.integrations.vllm.updater import VLLMUpdater

    config = SyncConfig.from_env(peft_mode="adapter", timeout_s=60)
    model = lora_model(model_dir)
    ep = fresh_endpoint()
    lora_dir = str(tmp_path / "adapters")
    with WeightPublisher(ep, config=config) as pub:
        updater = VLLMUpdater(server, ep, config=config, peft_model=model, lora_dir=lora_dir)
        attach_vllm(pub, updater)
        pub.wait_for_receivers(1, timeout=60)
        texts = []
        for step in (1, 2):
            nudge(model, seed=10 + step)
            pub.publish(model, step=step)
            assert updater.lora_model == "hotweights"
            texts.append(completion(server, "hotweights"))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    check = LoRARequest("serve-check", 99, adapter_path(lora_dir, 2))
    want = list(llm.generate([PROMPT], params, lora_request=check, use_tqdm=False)[0].outputs[0].token_ids)
    assert texts[1] == want  # the server serves version 2, not the version-1 adapter it loaded first
    assert texts[0] != texts[1]
    assert completion(server, str(model_dir)) != want  # the base model is still served as it was
