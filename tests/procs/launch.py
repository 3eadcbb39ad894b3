"""Run launcher command lines (torchrun, deepspeed, accelerate launch) the way a user types them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, child_env
from tests.procs import warm


def tool(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (where pip put it)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"launcher {name!r} not found next to {sys.executable} or on PATH")
    return found


def launch(cmd: list[str], *, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root with a deadline; fail with the output's tail if it fails."""
    proc = warm.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(**env), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def trainer_summary(stdout: str) -> dict[str, Any]:
    """The ``trainer: {json}`` a recipe prints on rank 0.

    The inference process shares rank 0's stdout, so its lines may directly follow the JSON.
    """
    marker = "trainer: {"
    count = stdout.count(marker)
    assert count == 1, f"expected one trainer summary, got {count}:\n{stdout[-3000:]}"
    start = stdout.index(marker) + len(marker) - 1
    summary, _ = json.JSONDecoder().raw_decode(stdout, start)
    return summary


def results(stdout: str) -> list[dict[str, Any]]:
    """``RESULT {json}`` records, one per rank, sorted by rank (the ranks share the launcher's stdout,
    so a record may be followed by another process's output on the same line)."""
    return sorted(json_records(stdout, "RESULT "), key=lambda r: r["rank"])


def json_records(text: str, marker: str) -> list[dict[str, Any]]:
    """Every JSON object that directly follows ``marker`` in ``text``."""
    decoder = json.JSONDecoder()
    out, pos = [], text.find(marker + "{")
    while pos >= 0:
        record, end = decoder.raw_decode(text, pos + len(marker))
        out.append(record)
        pos = text.find(marker + "{", end)
    return out
