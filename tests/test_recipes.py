"""Every recipe, launched exactly as its docstring and the README say, on CPU with two processes.

Each recipe's own inference process checks, after training, that its weights are bit-exact with the
trainer's final weights (taken from gathered full tensors) and fails the launch otherwise, so a zero
exit status is the bit-exactness check; the tests add the push counts: one push per ``every_n``
real optimizer steps, never per micro-batch.
"""

from __future__ import annotations

import sys
import uuid

import pytest

from tests.conftest import free_port, require
from tests.procs.launch import launch, tool, trainer_summary

pytestmark = pytest.mark.slow
TIMEOUT = 420  # two ranks plus an inference process on a small, shared machine


def endpoint() -> list[str]:
    return ["--endpoint", f"shm://t-{uuid.uuid4().hex[:12]}"]


def check_bit_exact(stdout: str) -> None:
    assert "receiver: bit-exact with the trainer's final weights" in stdout, stdout[-3000:]


def test_trainer_callback_recipe():
    require("hf")
    proc = launch([sys.executable, "recipes/trainer_callback.py", "--steps", "4", "--every-n", "2",
                   *endpoint()], timeout=TIMEOUT)
    s = trainer_summary(proc.stdout)
    assert s["optimizer_steps"] == 4 and s["pushed_steps"] == [2, 4] and s["versions"] == [1, 2]
    assert not s["sharded"]
    check_bit_exact(proc.stdout)


def test_trainer_callback_recipe_under_deepspeed_zero3():
    """HF Trainer + DeepSpeed + the unchanged HotweightsCallback on both ranks.

    ZeRO-3 only: under ZeRO-1/2 the callback pushes the unsharded model from rank 0, the path of the
    plain Trainer recipe above, through the same ``StepPusher`` that ``attach()`` drives in
    tests/test_optim_deepspeed.py at every stage; one launch fewer keeps the suite short.
    """
    require("hf")
    require("deepspeed")
    proc = launch([tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   "recipes/trainer_callback.py", "--deepspeed", "recipes/ds_zero3.json", "--steps", "3",
                   *endpoint()], timeout=TIMEOUT)
    s = trainer_summary(proc.stdout)
    assert s["deepspeed"] and s["world_size"] == 2
    assert s["sharded"]  # ZeRO-3 went through the bucket-sized gathers
    assert s["optimizer_steps"] == 3 and s["pushed_steps"] == [1, 2, 3]
    check_bit_exact(proc.stdout)


def test_accelerate_recipe_with_wrapped_optimizer_and_accumulation():
    require("hf")
    proc = launch([tool("accelerate"), "launch", "--config_file", "recipes/accelerate_cpu.yaml",
                   "--main_process_port", str(free_port()), "recipes/accelerate_loop.py",
                   "--steps", "4", "--grad-accum", "2", "--every-n", "2", "--wrap-optimizer", *endpoint()],
                  timeout=TIMEOUT)
    s = trainer_summary(proc.stdout)
    assert s["world_size"] == 2 and s["accelerate_num_processes"] == 2 and not s["deepspeed"]
    assert s["micro_steps"] == 8 and s["optimizer_steps"] == 4
    assert s["pushed_steps"] == [2, 4]  # optimizer steps / every_n; accumulation micro-steps never push
    check_bit_exact(proc.stdout)


def test_accelerate_recipe_under_deepspeed_zero3():
    require("hf")
    require("deepspeed")
    proc = launch([tool("accelerate"), "launch", "--config_file", "recipes/accelerate_cpu.yaml",
                   "--main_process_port", str(free_port()), "recipes/accelerate_loop.py",
                   "--deepspeed", "recipes/ds_zero3.json", "--steps", "3", "--grad-accum", "2", *endpoint()],
                  timeout=TIMEOUT)
    s = trainer_summary(proc.stdout)
    # On CPU Accelerate sees one process although torch.distributed has two: ranks come from the latter.
    assert s["deepspeed"] and s["sharded"] and s["world_size"] == 2
    assert s["optimizer_steps"] == 3 and s["pushed_steps"] == [1, 2, 3]
    check_bit_exact(proc.stdout)


def test_deepspeed_recipe_with_accumulation_via_deepspeed_launcher():
    # The recipe's other documented launch, torchrun, is the launcher of the Trainer-under-DeepSpeed
    # test above; one launch per framework keeps the suite short.
    require("hf")
    require("deepspeed")
    proc = launch([tool("deepspeed"), "--no_local_rank", "--num_gpus", "2", "--master_port", str(free_port()),
                   "recipes/deepspeed_zero3.py", "--steps", "6", "--grad-accum", "2", "--every-n", "2",
                   *endpoint()], timeout=TIMEOUT)
    s = trainer_summary(proc.stdout)
    assert s["zero_stage"] == 3 and s["sharded"] and s["world_size"] == 2
    assert s["micro_steps"] == 12 and s["optimizer_steps"] == s["global_steps"] == 6
    assert s["pushes"] == 6 // 2 and s["pushed_steps"] == [2, 4, 6]
    check_bit_exact(proc.stdout)
