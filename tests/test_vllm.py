"""The "hotweights" vLLM backend against a real vLLM engine (CPU build), one engine for the module.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the same worker, engine and
loader code as the multi-process engine, started in seconds; the TP=2 test (test_vllm_tp.py) runs
the multi-process engine. The model is a tiny Llama made locally, nothing is downloaded.
"""

from __future__ import annotations

import sys
import time
import uuid

import pytest
import torch

from tests.conftest import ROOT, child_env, in_process_llm, require
from tests.procs.spawn import Proc

sys.path.insert(0, str(ROOT / "recipes"))

PROMPT = "hotweights moves weights from the trainer"
pytestmark = pytest.mark.slow  # a vLLM engine for the module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require("vllm")
    from tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def llm(model_dir):
    with in_process_llm(model_dir) as engine:
        yield engine


def prompt_logprobs(llm) -> tuple[list[float], list[int]]:
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    return [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], ids


def hf_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def checksums(llm) -> dict:
    out: dict = {}
    for worker in llm.llm_engine.collective_rpc("compute_weight_checksums"):
        out.update(worker)
    return out


def checksums_of_checkpoint(llm, model, folder) -> dict:
    """Checksums of vLLM's weights after vLLM itself loads ``model`` saved to disk."""
    model.save_pretrained(folder)
    llm.llm_engine.collective_rpc("reload_weights", kwargs={"weights_path": str(folder),
                                                            "is_checkpoint_format": True})
    return checksums(llm)


def update(llm, version: int, timeout_s: float = 30.0) -> None:
    llm.start_weight_update()
    llm.update_weights({"update_info": {"version": version, "timeout_s": timeout_s}})
    llm.finish_weight_update(str(version))
    llm.reset_prefix_cache()


def follow(llm, endpoint: str, **overrides) -> None:
    llm.init_weight_transfer_engine({"init_info": {"endpoint": endpoint, "timeout_s": 30, **overrides}})


def fresh_endpoint() -> str:
    return f"shm://vllm-{uuid.uuid4().hex[:10]}"


def perturbed(model_dir, seed: int, scale: float = 0.05):
    from tiny_llama import load_hf

    model = load_hf(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def test_update_matches_hf_and_reports_version(llm, model_dir):
    from hotweights_trainer import WeightPublisher

    before, ids = prompt_logprobs(llm)
    model = perturbed(model_dir, seed=1)
    ep = fresh_endpoint()
    with WeightPublisher(ep) as pub:
        follow(llm, ep)
        pub.wait_for_receivers(1, timeout=30)
        version = pub.publish(model, step=1).version
        update(llm, version)
    after, _ = prompt_logprobs(llm)
    expected = hf_logprobs(model, ids)
    assert max(abs(a - e) for a, e in zip(after, expected)) < 1e-4
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-2
    assert llm.get_weight_version() == str(version)


def test_delta_versions_end_bit_exact(llm, model_dir, tmp_path):
    """Several optimizer steps, default delta=auto, only part of the model trained (as with frozen
    layers; in fp32 Adam moves every element of a trained tensor): vLLM ends holding exactly the
    bytes vLLM's own loader produces from the trainer's final weights."""
    from hotweights_trainer import WeightPublisher

    model = perturbed(model_dir, seed=2)
    trained = [p for n, p in model.named_parameters() if n.startswith("model.layers.1.mlp")]
    for p in model.parameters():
        p.requires_grad_(any(p is t for t in trained))
    opt = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ep = fresh_endpoint()
    results = []
    with WeightPublisher(ep) as pub:
        follow(llm, ep)
        pub.wait_for_receivers(1, timeout=30)
        for step in range(1, 5):
            if step > 1:
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
            results.append(pub.publish(model, step=step))
            update(llm, results[-1].version)
        synced = checksums(llm)
    assert llm.get_weight_version() == str(results[-1].version)
    assert any(r.bytes_sent < results[0].bytes_sent / 2 for r in results[1:]), \
        f"later versions were not sent as deltas: {[r.bytes_sent for r in results]}"
    assert synced == checksums_of_checkpoint(llm, model, tmp_path / "final")


def test_version_that_does_not_fit_is_refused_with_names(llm, model_dir):
    from hotweights_trainer import ManifestMismatchError, WeightPublisher

    ep = fresh_endpoint()
    with WeightPublisher(ep) as pub:
        follow(llm, ep)
        pub.wait_for_receivers(1, timeout=30)
        good = perturbed(model_dir, seed=3)
        update(llm, pub.publish(good, step=1).version)
        before, _ = prompt_logprobs(llm)

        bad = dict(good.state_dict())
        bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(96, 64)
        with pytest.raises(ManifestMismatchError, match="up_proj"):
            pub.publish(bad, step=2)
        partial = {k: v for k, v in good.state_dict().items() if "layers.1.self_attn.k_proj" not in k}
        with pytest.raises(ManifestMismatchError, match="k_proj.weight.*missing"):
            pub.publish(partial, step=3)

        llm.start_weight_update()
        with pytest.raises(ManifestMismatchError, match="up_proj"):
            llm.update_weights({"update_info": {"version": 2, "timeout_s": 5}})
    after, _ = prompt_logprobs(llm)
    assert after == before


def test_publisher_killed_mid_version(llm, model_dir):
    from hotweights_trainer import PeerLostError, SyncTimeoutError

    ep = fresh_endpoint()
    proc = Proc(["tests/procs/vllm_publisher.py", "--endpoint", ep, "--model", str(model_dir)],
                env=child_env())
    try:
        follow(llm, ep, timeout_s=5)
        assert proc.next(timeout=120) == {"published": 1}
        update(llm, 1)
        before, _ = prompt_logprobs(llm)
        assert proc.next(timeout=60) == {"mid": 2}
        proc.p.kill()
        proc.p.wait(10)
        llm.start_weight_update()
        t0 = time.monotonic()
        with pytest.raises((SyncTimeoutError, PeerLostError), match="version >= 2|went away"):
            llm.update_weights({"update_info": {"version": 2, "timeout_s": 4}})
        assert time.monotonic() - t0 < 15, "update_weights did not respect its deadline"
        after, _ = prompt_logprobs(llm)
        assert after == before
        assert llm.get_weight_version() == "1"
    finally:
        if proc.p.poll() is None:
            proc.p.kill()


def test_bad_init_and_update_info_name_the_key(llm):
    from hotweights_trainer import ConfigError

    with pytest.raises(ConfigError, match="bucket_size_mb"):
        llm.init_weight_transfer_engine({"init_info": {"endpoint": fresh_endpoint(), "bucket_size_mb": 4}})
    follow(llm, fresh_endpoint())
    llm.start_weight_update()
    with pytest.raises(ConfigError, match="'version'"):
        llm.update_weights({"update_info": {"versoin": 1}})
    with pytest.raises(ConfigError):
        from hotweights_trainer.integrations.vllm.options import parse_update_info

        parse_update_info({"version": 1, "timeout_s": -1})


def test_trainer_callback_drives_vllm(llm, model_dir, tmp_path):
    """HF Trainer + HotweightsCallback(vllm=llm): every optimizer step becomes the engine's weights."""
    from transformers import Trainer, TrainingArguments

    from hotweights_trainer import HotweightsCallback

    model = perturbed(model_dir, seed=4)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 300, (12, 16), generator=g)]
    ep = fresh_endpoint()
    cb = HotweightsCallback(ep, vllm=llm)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb]).train()
    assert [r.version for r in cb.results] == [1, 2, 3]
    assert cb.vllm.version == 3 and llm.get_weight_version() == "3"
    synced = checksums(llm)
    assert synced == checksums_of_checkpoint(llm, model, tmp_path / "final")


def test_step_pusher_drives_vllm_once_per_version(llm, model_dir):
    """The pusher behind Accelerate and DeepSpeed: one vLLM update per version, none per tensor."""
    from hotweights_trainer.integrations.pusher import StepPusher

    model = perturbed(model_dir, seed=5)
    calls: list[str] = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            fn = getattr(self.inner, name)

            def wrapped(*a, **kw):
                calls.append(name)
                return fn(*a, **kw)
            return wrapped

    with StepPusher(fresh_endpoint(), vllm=Counting(llm)) as pusher:
        for _ in range(2):
            with torch.no_grad():
                model.lm_head.weight.mul_(0.9)
            pusher.optimizer_stepped(model)
    assert calls.count("update_weights") == 2
    assert calls.count("init_weight_transfer_engine") == 1
    assert calls.count("reset_prefix_cache") == 2
    assert llm.get_weight_version() == "2"


def test_vllm_trainer_api_switches_by_backend_name(llm, model_dir, tmp_path):
    """Code written against vLLM's trainer-side engine API works with the hotweights init info."""
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

    from hotweights_trainer.integrations.vllm import HotweightsTrainerInitInfo, register

    register()  # what the entry point does in a process vLLM started; idempotent
    model = perturbed(model_dir, seed=6)
    engine = WeightTransferTrainerFactory.trainer_init(
        HotweightsTrainerInitInfo(endpoint=fresh_endpoint(), rank=0, config={"timeout_s": 30}),
        client=llm, source=ModuleSource(model))
    try:
        first = engine.send_weights()
        with torch.no_grad():
            model.model.norm.weight.add_(0.25)
        second = engine.send_weights()
    finally:
        engine.shutdown()
    assert (first.version, second.version) == (1, 2)
    assert llm.get_weight_version() == "2"
    assert checksums(llm) == checksums_of_checkpoint(llm, model, tmp_path / "final")
