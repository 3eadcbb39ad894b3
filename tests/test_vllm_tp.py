"""Tensor parallelism: both ranks of a real multi-process vLLM engine (TP=2, CPU) load the same version."""

from __future__ import annotations

import json

import pytest

from tests.conftest import child_env, require, run_python

pytestmark = pytest.mark.slow  # a multi-process vLLM engine with two ranks


def test_tp2_ranks_load_the_same_newest_version():
    require("vllm")
    env = child_env(VLLM_CPU_OMP_THREADS_BIND="0|1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = run_python(["tests/procs/vllm_tp.py"], timeout=420, env=env)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("{"))
    out = json.loads(line)
    assert out["connected"] == 2
    assert out["versions"] == [1, 2, 3]
    assert out["weight_version"] == "3"
    assert out["ranks"] == [3, 3], "each rank reports the hotweights version it loaded"
    assert out["tensors"] > 0
    assert out["equal"], "the ranks' weights differ from vLLM's own load of version 3"
