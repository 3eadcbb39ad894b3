"""PEFT / LoRA models: merged sync under the base model's names, adapter-only sync, refusals.

Real parts throughout: peft's get_peft_model / merge_and_unload, the HF Trainer, receivers in their
own processes (tests/procs/peft_receiver.py) or threads, torchrun + DeepSpeed ZeRO-3 for the sharded
path. "Bit-exact" means equal xxh3 digests of every tensor's raw bytes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.conftest import free_port, require, run_python
from tests.procs.spawn import Proc

RX = "tests.procs.peft_receiver"


def _receiver(endpoint: str, *args: str) -> Proc:
    rx = Proc(["-m", RX, "--endpoint", endpoint, *args])
    assert rx.next(90)["ready"]
    return rx


def _merged_digest(model: torch.nn.Module) -> str:
    """What peft itself makes of the trained model: merge_and_unload() on a copy."""
    from hotweights_trainer.verify import combined_digest, weights_digest

    return combined_digest(weights_digest(copy.deepcopy(model).merge_and_unload()))


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    now = dict(model.named_parameters())
    return [n for n, t in before.items() if not torch.equal(now[n].detach(), t)]


def _lm_batch(vocab: int, n: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, seq))
    return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------------------------------- merged mode
def test_hf_trainer_lora_merged_sync_is_bit_exact_and_frozen_weights_stay(endpoint, tmp_path):
    require("peft")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hotweights_trainer import HotweightsCallback, SyncConfig
    from hotweights_trainer.verify import weights_digest
    from tests.procs.peft_models import LLAMA, llama, with_lora

    steps = 4
    rx = _receiver(endpoint, "--kind", "plain", "--until-step", str(steps))
    try:
        model = with_lora(llama(seed=0))
        frozen = _frozen(model)
        assert len(frozen) > 10  # the base model: what must stay bit for bit
        data = [{k: v[0] for k, v in _lm_batch(LLAMA["vocab_size"], 1).items()} for _ in range(32)]
        cb = HotweightsCallback(endpoint, config=SyncConfig(timeout_s=60))  # peft_mode and delta: defaults

        class WaitForReceiver(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                cb.publisher.wait_for_receivers(1)

        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=steps,
                                 per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                                 disable_tqdm=True, learning_rate=1e-2)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, WaitForReceiver()]).train()

        assert [r.step for r in cb.results] == [1, 2, 3, 4]
        expected = _merged_digest(model)
        got = [rx.next() for _ in range(steps)]
        assert [g["step"] for g in got] == [1, 2, 3, 4], got
        assert got[-1]["digests"]["all"] == expected
        assert len({g["digests"]["all"] for g in got}) == steps  # every push carried new weights
        assert _unchanged(frozen, model) == []
        # Base-model names only (no base_layer / lora_A / modules_to_save), one per merged tensor.
        plain_names = set(weights_digest(copy.deepcopy(model).merge_and_unload()))
        assert cb.results[0].tensors_sent == len(plain_names)
        # Delta sync (default auto): only the LoRA'd layers and lm_head change, so later pushes are small.
        assert cb.results[-1].delta is not None and cb.results[-1].bytes_sent < 0.5 * cb.results[0].bytes_sent
    finally:
        rx.kill()


def test_bf16_twenty_pushes_leave_frozen_weights_bit_identical(endpoint):
    require("peft")
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.peft_models import LLAMA, llama, with_lora

    model = with_lora(llama(seed=0, dtype="bfloat16"), dtype=None)  # peft keeps the adapters in float32
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    frozen = _frozen(model)
    plain = llama(seed=7, dtype="bfloat16")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    cfg = SyncConfig(timeout_s=60)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=plain, config=cfg) as rx:
        pub.wait_for_receivers(1)
        for step in range(1, 21):
            model(**_lm_batch(LLAMA["vocab_size"])).loss.backward()
            opt.step()
            opt.zero_grad()
            pub.publish(model, step=step)
            assert rx.wait_for_version(step) == step
    assert _unchanged(frozen, model) == []
    assert combined_digest(weights_digest(plain)) == _merged_digest(model)
    # The test has teeth: merging into the weights and unmerging (what other libraries do) drifts in bf16.
    naive = copy.deepcopy(model)
    naive.merge_adapter()
    naive.unmerge_adapter()
    assert _unchanged(frozen, naive) != []


def test_accelerate_loop_pushes_the_merged_lora_model(endpoint):
    require("peft")
    require("hf")
    from accelerate import Accelerator

    from hotweights_trainer import SyncConfig, WeightReceiver
    from hotweights_trainer.integrations.accelerate import AccelerateSync
    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.peft_models import LLAMA, llama, with_lora

    accelerator = Accelerator(cpu=True)
    model = with_lora(llama(seed=0))
    frozen = _frozen(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    plain = llama(seed=5)
    cfg = SyncConfig(timeout_s=30)
    with AccelerateSync(accelerator, endpoint, config=cfg) as sync, \
            WeightReceiver(endpoint, model=plain, config=cfg) as rx:
        sync.wait_for_receivers(1)
        for step in (1, 2):
            accelerator.backward(model(**_lm_batch(LLAMA["vocab_size"])).loss)
            opt.step()
            assert sync.after_step(model).version == step
            opt.zero_grad()
            rx.wait_for_version(step)
    assert combined_digest(weights_digest(plain)) == _merged_digest(accelerator.unwrap_model(model))
    assert _unchanged(frozen, accelerator.unwrap_model(model)) == []


def test_async_snapshot_of_a_lora_model_is_merged_and_announced(endpoint):
    require("peft")
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.async_publisher import AsyncPublisher
    from hotweights_trainer.errors import PeftModeError
    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.peft_models import llama, with_lora

    model, plain = with_lora(llama(seed=0)), llama(seed=5)
    cfg = SyncConfig(timeout_s=30, async_publish=True)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=plain, config=cfg) as rx, \
            AsyncPublisher(pub, config=cfg) as apub:
        pub.wait_for_receivers(1)
        assert apub.submit(model, step=1)  # snapshot taken now, in the merged form
        apub.flush()
        rx.wait_for_version(1)
    assert apub.results[0].tensors_sent == len(weights_digest(plain))
    assert combined_digest(weights_digest(plain)) == _merged_digest(model)
    # The snapshot carries its form: an adapter-mode snapshot is refused by a plain receiver by name.
    cfg = cfg.replace(peft_mode="adapter")
    with WeightPublisher(endpoint + "a", config=cfg) as pub, \
            WeightReceiver(endpoint + "a", model=plain, config=cfg) as rx, AsyncPublisher(pub, config=cfg) as apub:
        pub.wait_for_receivers(1)
        apub.submit(model, step=1)
        with pytest.raises(PeftModeError, match="adapter-mode version sent to a receiver without a PeftModel"):
            apub.flush()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96, n_positions=32))


def _convnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))


@pytest.mark.parametrize("case", ["bias_and_two_adapters", "gpt2_fan_in_fan_out", "conv2d"])
def test_other_plain_lora_forms_merge_bit_exact(endpoint, case):
    require("peft")
    from peft import LoraConfig, get_peft_model

    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.verify import combined_digest, weights_digest
    from tests.procs.peft_models import llama

    def lora(**kw):
        return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)

    if case == "bias_and_two_adapters":  # lora_bias adds to the base bias; both active adapters merge
        model = get_peft_model(llama(seed=0, attention_bias=True),
                               lora(target_modules=["q_proj", "v_proj"], lora_bias=True))
        model.add_adapter("second", lora(target_modules=["q_proj", "k_proj"]))
        model.base_model.set_adapter(["default", "second"])
        assert model.base_model.model.model.layers[0].self_attn.q_proj.active_adapters == ["default", "second"]
    elif case == "gpt2_fan_in_fan_out":  # GPT-2's Conv1D stores weights transposed
        model = get_peft_model(_gpt2(), lora(target_modules=["c_attn"], fan_in_fan_out=True))
    else:
        model = get_peft_model(_convnet(), lora(target_modules=["0", "2"]))
    held = copy.deepcopy(model).merge_and_unload()
    expected = combined_digest(weights_digest(held))
    with torch.no_grad():
        for t in held.state_dict().values():
            t.zero_()  # what the receiver ends with comes from the wire
    cfg = SyncConfig(timeout_s=20)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=held, config=cfg) as rx:
        pub.wait_for_receivers(1)
        pub.publish(model)
        rx.wait_for_version(1)
    assert combined_digest(weights_digest(held)) == expected


def test_dora_is_refused_by_merged_sync_before_anything_is_sent(endpoint):
    require("peft")
    from hotweights_trainer import ConfigError, SyncConfig, WeightPublisher
    from hotweights_trainer.errors import UnsupportedAdapterError
    from tests.procs.peft_models import llama, with_lora

    model = with_lora(llama(seed=0), use_dora=True, target_modules=["q_proj"], modules_to_save=None)
    with WeightPublisher(endpoint, config=SyncConfig(timeout_s=10)) as pub:
        with pytest.raises(UnsupportedAdapterError) as err:
            pub.publish(model)
        assert pub.version == 0  # refused before begin: no version was used up
    assert isinstance(err.value, ConfigError)
    text = str(err.value)
    assert "DoraLinearVariant" in text and "use_dora" in text and "peft_mode=adapter" in text
    assert "layers.0.self_attn.q_proj" in text and "layers.1.self_attn.q_proj" in text  # every layer named


def test_merged_version_to_a_peft_receiver_is_refused(endpoint):
    require("peft")
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.errors import ManifestMismatchError, PeftModeError
    from tests.procs.peft_models import llama, split_digests, with_lora

    held = with_lora(llama(seed=1))
    before = split_digests(held)
    cfg = SyncConfig(timeout_s=20)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=held, config=cfg) as rx:
        pub.wait_for_receivers(1)
        with pytest.raises(PeftModeError) as err:
            pub.publish(with_lora(llama(seed=0)))
        with pytest.raises(PeftModeError):
            rx.poll()  # the receiver reports it too, once
    assert isinstance(err.value, ManifestMismatchError)
    assert "merged-mode version" in str(err.value) and "holding a PeftModel" in str(err.value)
    assert split_digests(held) == before


# ---------------------------------------------------------------------------------------- adapter mode
def test_adapter_mode_sends_about_the_adapter_bytes_and_is_bit_exact(endpoint):
    require("peft")
    from peft import get_peft_model_state_dict

    from hotweights_trainer import SyncConfig, WeightPublisher
    from tests.procs.peft_models import LLAMA, llama, split_digests, with_lora

    # The receiver's base model differs (seed 99): adapter mode must not touch it, only the adapters.
    rx = _receiver(endpoint, "--kind", "peft", "--versions", "3")
    try:
        model = with_lora(llama(seed=0))
        # peft's own idea of the adapter: LoRA factors and modules_to_save copies (not the base embedding).
        adapter = get_peft_model_state_dict(model, save_embedding_layers=False)
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
        whole_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert adapter_bytes * 4 < whole_bytes
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        results, got = [], []
        with WeightPublisher(endpoint, config=SyncConfig(timeout_s=60, peft_mode="adapter")) as pub:
            pub.wait_for_receivers(1)
            for step in (1, 2, 3):
                model(**_lm_batch(LLAMA["vocab_size"])).loss.backward()
                opt.step()
                opt.zero_grad()
                results.append(pub.publish(model, step=step))
                got.append(rx.next())
                assert got[-1]["digests"]["adapter"] == split_digests(model)["adapter"]
        assert all(r.bytes_sent <= 1.1 * adapter_bytes for r in results), [r.bytes_sent for r in results]
        assert results[0].tensors_sent == len(adapter)
        assert len({g["digests"]["adapter"] for g in got}) == 3
        assert len({g["digests"]["rest"] for g in got}) == 1  # its own base weights were left alone
    finally:
        rx.kill()


def test_adapter_version_to_a_plain_receiver_is_refused_by_name(endpoint):
    require("peft")
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.errors import PeftModeError
    from hotweights_trainer.verify import weights_digest
    from tests.procs.peft_models import llama, with_lora

    plain = llama(seed=1)
    before = weights_digest(plain)
    cfg = SyncConfig(timeout_s=20, peft_mode="adapter")
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=plain, config=cfg) as rx:
        pub.wait_for_receivers(1)
        with pytest.raises(PeftModeError) as err:
            pub.publish(with_lora(llama(seed=0)))
        with pytest.raises(PeftModeError):
            rx.poll()
    assert "adapter-mode version sent to a receiver without a PeftModel" in str(err.value)
    assert "LlamaForCausalLM" in str(err.value)
    assert weights_digest(plain) == before


def test_dora_adapter_mode_reaches_a_dora_receiver_bit_exact(endpoint):
    require("peft")
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from tests.procs.peft_models import llama, split_digests, with_lora

    dora = dict(use_dora=True, target_modules=["q_proj", "v_proj"], modules_to_save=None)
    model, held = with_lora(llama(seed=0), **dora), with_lora(llama(seed=1), **dora)
    assert split_digests(model)["adapter"] != split_digests(held)["adapter"]
    cfg = SyncConfig(timeout_s=20, peft_mode="adapter")
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=held, config=cfg) as rx:
        pub.wait_for_receivers(1)
        pub.publish(model)
        rx.wait_for_version(1)
    assert split_digests(held)["adapter"] == split_digests(model)["adapter"]  # magnitude vectors included


# ---------------------------------------------------------------------------------------- pieces
def test_zero3_groups_keep_each_lora_layer_whole_and_count_its_merged_copy():
    require("peft")
    from hotweights_trainer.integrations.gather import full_nbytes, plan_groups, sharded_items
    from hotweights_trainer.peft_sync import PeftView
    from tests.procs.peft_models import llama, with_lora

    model = with_lora(llama(seed=0), target_modules=["q_proj", "v_proj"], modules_to_save=None)
    view = PeftView(model, "merged")
    items = [(n, t) for n, t in sharded_items(model) if view.needed(n, t)]
    q = full_nbytes(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    for budget in (q, q + 1, 2 * q, 3 * q + 7):  # boundaries fall everywhere a plain plan would cut
        groups = plan_groups(items, budget, unit_of=view.unit_of,
                             size_of=lambda n, t: full_nbytes(t) * (2 if view.makes_copy(n, t) else 1))
        where = {n: i for i, g in enumerate(groups) for n, _ in g}
        for name in where:
            if ".base_layer.weight" in name:
                layer = name[:-len(".base_layer.weight")]
                assert where[f"{layer}.lora_A.default.weight"] == where[name] == where[f"{layer}.lora_B.default.weight"]
        for g in groups:  # held bytes (gathered + merged copies) within budget unless one unit alone exceeds it
            held = sum(full_nbytes(t) * (2 if view.makes_copy(n, t) else 1) for n, t in g)
            assert held <= budget or len({view.unit_of(n, t) for n, t in g}) == 1
    adapter = PeftView(model, "adapter")
    assert not any(adapter.needed(n, t) for n, t in sharded_items(model) if ".base_layer." in n)


def test_missing_peft_gives_the_install_command():
    proc = run_python("import sys\n"
                      "sys.modules['peft'] = None  # as if peft were not installed\n"
                      "import torch\n"
                      "from hotweights_trainer.peft_sync import PeftView\n"
                      "try:\n"
                      "    PeftView(torch.nn.Linear(2, 2), 'merged')\n"
                      "except ImportError as exc:\n"
                      "    print(exc)\n", check=True)
    assert "pip install 'hotweights_trainer[peft]'" in proc.stdout


def test_peft_mode_from_env_and_validation():
    from hotweights_trainer import ConfigError, SyncConfig

    assert SyncConfig.from_env({}).peft_mode == "merged"
    assert SyncConfig.from_env({"HOTWEIGHTS_PEFT_MODE": "adapter"}).peft_mode == "adapter"
    with pytest.raises(ConfigError, match="HOTWEIGHTS_PEFT_MODE"):
        SyncConfig.from_env({"HOTWEIGHTS_PEFT_MODE": "lora"})


# ---------------------------------------------------------------------------------------- ZeRO-3
@pytest.mark.slow
def test_zero3_lora_merged_sync_is_bit_exact_with_bounded_memory():
    require("deepspeed")
    require("peft")
    import uuid

    from tests.procs.launch import launch, results, tool

    ep = f"shm://t-{uuid.uuid4().hex[:12]}"
    proc = launch([tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "tests/procs/zero3_peft.py", "--endpoint", ep, "--bucket-mb", "1"],
                  timeout=400, MALLOC_MMAP_THRESHOLD_="65536")
    rows = results(proc.stdout)
    assert [r["rank"] for r in rows] == [0, 1]
    main = rows[0]
    assert main["sharded"], main
    # Delta-synced pushes after each step and the measured dense push: all equal merge_and_unload().
    assert main["delta_versions"] == [1, 2, 3] and main["delta_bit_exact"] == [True, True, True], main
    assert main["dense_bit_exact"] and main["frozen_unchanged"], main
    assert main["later_delta_smaller"], main
    for r in rows:
        bucket, model = r["bucket_bytes"], r["model_bytes"]
        assert model >= 8 * bucket, r
        assert r["lora_layers_split"] == 0, r  # base weight and factors always in one gather group
        assert r["live_bytes_high"] <= bucket, r
        assert r["ours_extra"] <= 2 * bucket + (1 << 20), r  # the bound of tests/test_zero3_memory.py
