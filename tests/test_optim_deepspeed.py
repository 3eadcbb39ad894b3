"""DeepSpeed ZeRO with two CPU processes: resume with swapped weights under each policy.

The measurements come from ``tests/procs/ds_opt_resume.py`` run by torchrun; see its docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, child_env, free_port, require

LR = 1e-3  # the script's learning rate: one Adam step moves a weight by at most about LR


CASES = "reset,attenuate,preserve,reset_all,control"


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory) -> dict[int, dict[str, dict]]:
    """Every stage in one torchrun launch (starting two DeepSpeed ranks costs more than the cases)."""
    require("deepspeed")
    folder = tmp_path_factory.mktemp("ds-resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "tests" / "procs" / "ds_opt_resume.py"), "--dir", str(folder / "ckpt"),
           "--zero", f"2:{CASES}", "--zero", f"3:{CASES}", "--zero", "1:attenuate",
           "--push", f"shm://t-dsopt-{uuid.uuid4().hex[:8]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=child_env(), cwd=ROOT)
    assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    out: dict[int, dict[str, dict]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out.setdefault(row["stage"], {})[row["case"]] = row
    return out


def check_moves_from_new_weights(params: dict) -> None:
    for name, row in params.items():
        assert row["master_equals_weights"], name  # fp32 master equals the (swapped) weights
        if row["swapped"]:
            assert row["dist_from_new"] <= 1.5 * LR and row["dist_from_old"] > 0.3, (name, row)
        else:
            assert row["dist_from_old"] <= 1.5 * LR, (name, row)


def moments(row: dict, flag: str) -> bool:
    return all(row[k][flag] and row[k]["nonzero_before"] for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_with_swapped_weights(ds_runs, stage):
    out = ds_runs[stage]
    backend = "deepspeed-zero3" if stage == 3 else "deepspeed-zero12"

    # attach() honours async_publish: the pushes went through the background publisher. A boundary
    # reached while the previous push was still out is skipped (staleness_policy=skip), but the final
    # push, entered by every rank and sent by rank 0 only if step 3 was skipped, always carries step 3
    # and never leaves a ZeRO-3 gather waiting.
    push = out["push"]
    steps = push["pushed_steps"]
    assert push["errors"] == 0 and push["final"] and steps[-1] == 3 and steps == sorted(set(steps))
    assert push["async_pushes"] == len(steps) and push["versions"] == list(range(1, len(steps) + 1))
    # preserve needs no sidecar; the callback skips it where it would gather every parameter (ZeRO-3).
    assert push["sidecar_written"] == {"preserve": stage != 3, "reset": True}

    reset = out["reset"]
    assert reset["report"]["backend"] == backend
    counts = reset["report"]
    assert (counts["preserved"], counts["reset"], counts["master_synced"]) == (3, 3, 3)
    for row in reset["params"].values():
        assert moments(row, "zero" if row["swapped"] else "equal"), row
    assert any("shared step counter" in n for n in reset["report"]["notes"])
    check_moves_from_new_weights(reset["params"])

    att = out["attenuate"]
    counts = att["report"]
    assert (counts["preserved"], counts["attenuated"], counts["master_synced"]) == (3, 3, 3)
    for row in att["params"].values():
        assert moments(row, "scaled" if row["swapped"] else "equal"), row
    assert att["steps"] == [4.0]  # attenuate keeps step
    check_moves_from_new_weights(att["params"])

    keep = out["preserve"]
    assert (keep["report"]["preserved"], keep["report"]["master_synced"]) == (6, 3)
    assert all(moments(row, "equal") for row in keep["params"].values())
    check_moves_from_new_weights(keep["params"])

    # Every parameter updated: the group's step counter can be reset too, so the next step is a fresh
    # optimizer's first step, which for Adam moves each weight by lr * g / (|g| + eps), i.e. by lr.
    every = out["reset_all"]
    assert every["report"]["reset"] == 6 and every["report"]["notes"] == [] and every["steps"] == [1.0]
    assert all(moments(row, "zero") for row in every["params"].values())
    assert all(abs(row["dist_from_new"] - LR) < 1e-5 for row in every["params"].values())

    # Without the policy the stale fp32 master wins: one step puts the old weights back.
    control = out["control"]
    for name, row in control["params"].items():
        if row["swapped"]:
            assert not row["master_equals_weights"] and row["dist_from_old"] <= 1.5 * LR, (name, row)


@pytest.mark.slow
def test_zero1_resume_attenuate(ds_runs):
    att = ds_runs[1]["attenuate"]
    push = ds_runs[1]["push"]  # ZeRO-1 pushes through the same attach() path
    assert push["errors"] == 0 and push["final"] and push["pushed_steps"][-1] == 3
    assert att["report"]["backend"] == "deepspeed-zero12" and att["report"]["attenuated"] == 3
    for row in att["params"].values():
        assert moments(row, "scaled" if row["swapped"] else "equal"), row
    check_moves_from_new_weights(att["params"])
