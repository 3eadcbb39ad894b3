"""recipes/vllm_serve.sh as a user runs it: a real vLLM OpenAI server with the hotweights backend,
updated over vLLM's RL HTTP routes after every optimizer step of an HF Trainer."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env, require

pytestmark = pytest.mark.slow


def test_vllm_serve_recipe():
    require("vllm")
    require("hf")
    env = child_env(PYTHON=sys.executable, STEPS="4")
    proc = subprocess.run(["bash", "recipes/vllm_serve.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    steps = re.findall(r"^step +(\d+) +version +(\d+) ", proc.stdout, re.M)
    assert [(int(s), int(v)) for s, v in steps] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert "server weight_version 4, trainer's last version 4" in proc.stdout
