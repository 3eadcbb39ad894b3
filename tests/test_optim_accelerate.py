"""Accelerate: the policy applied right after ``accelerator.load_state``, plain and with DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env, free_port, require, run_python

SCRIPT = str(ROOT / "tests" / "procs" / "accel_opt_resume.py")
LR = 1e-3
SWAPPED = {"0.weight", "2.bias"}


def parse(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


def check_moves_from_new(out: dict) -> None:
    assert out["restored"]  # load_state really brought the saved weights back before the swap
    assert sorted(out["report"]["updated"]) == sorted(SWAPPED)
    for name, dist in out["dist_from_old"].items():
        if name in SWAPPED:
            assert out["dist_from_new"][name] <= 1.5 * LR and dist > 0.3, (name, out)
        else:
            assert dist <= 1.5 * LR, (name, out)


@pytest.mark.slow
def test_accelerate_load_state_then_reset(tmp_path):
    require("hf")
    proc = run_python([SCRIPT, "--dir", str(tmp_path / "state"), "--policy", "reset"], timeout=180)
    out = parse(proc.stdout)
    report = out["report"]
    assert report["backend"] == "torch" and (report["reset"], report["preserved"]) == (2, 2)
    check_moves_from_new(out)
    # Reset parameters took a fresh optimizer's first step; the others continued at step 4.
    assert out["steps"] == {"0.weight": 1.0, "0.bias": 4.0, "2.weight": 4.0, "2.bias": 1.0}


@pytest.mark.slow
def test_accelerate_deepspeed_zero2_load_state_then_attenuate(tmp_path):
    require("hf")
    require("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT, "--deepspeed",
           "--dir", str(tmp_path / "state"),
           "--policy", "attenuate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=child_env(ACCELERATE_USE_DEEPSPEED="true"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = parse(proc.stdout)
    report = out["report"]
    assert report["backend"] == "deepspeed-zero12"
    assert (report["attenuated"], report["preserved"], report["master_synced"]) == (2, 2, 2)
    check_moves_from_new(out)
