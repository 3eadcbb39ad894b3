"""The transport subcommands and the mpirun recipe, run the way a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, child_env, require, run_python
from tests.procs.spawn import Proc


def _hotweights(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_python(["-m", "hotweights_trainer", *args], timeout=timeout)


def test_doctor_reports_transports_and_the_auto_choice():
    report = json.loads(_hotweights("doctor", "--json").stdout)
    t = report["transports"]
    assert {"shm", "torch", "mpi", "ucx"} <= set(t)
    assert t["shm"]["available"] and t["shm"]["zero_copy"] and "cross_host" in t["shm"]["limits"]
    assert t["torch"]["available"] and "gloo" in t["torch"]["detail"]
    assert report["auto"]["shm://NAME"]["choice"] == "shm"
    assert report["auto"]["mpi://"]["choice"] == "mpi"
    assert report["auto"]["tcp://REMOTE-HOST:PORT"]["choice"] == ("ucx" if t["ucx"]["available"] else "torch")
    assert {"mpi_launcher", "ucx_module", "cuda_available"} <= set(report["auto_inputs"])
    text = _hotweights("doctor").stdout
    assert "auto for shm://NAME" in text and "no cross_host" in text


def test_publish_and_receive_commands_over_torch():
    pub = Proc(["-m", "hotweights_trainer", "publish", "--endpoint", "tcp://127.0.0.1:0", "--transport",
                "torch", "--versions", "2", "--size-mb", "6", "--bucket-mb", "1", "--receivers", "1",
                "--timeout", "30", "--json"])
    rx = None
    try:
        endpoint = pub.next(60)["endpoint"]  # the port it bound
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
        rx = Proc(["-m", "hotweights_trainer", "receive", "--endpoint", endpoint, "--transport", "torch",
                   "--versions", "2", "--timeout", "30", "--json"])
        published = [pub.next(60), pub.next(60)]
        got = [rx.next(30), rx.next(30)]
        assert rx.wait(30) == 0 and pub.wait(30) == 0
    finally:
        for p in (pub, rx):
            if p is not None:
                p.kill()
    assert [p["version"] for p in published] == [1, 2] and all(p["receivers"] == 1 for p in published)
    assert [g["digest"] for g in got] == [p["digest"] for p in published]
    assert published[0]["digest"] != published[1]["digest"] and published[0]["transport"] == "torch"


def test_mpirun_recipe_verifies_every_receiver():
    require("mpi")
    env = child_env(PYTHON=sys.executable, NP="3", VERSIONS="2", SIZE_MB="8", CHUNK_MB="1", WINDOW="2")
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "mpirun_cpu_fallback.sh")], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verified: 2 receivers x 2 versions bit-exact" in proc.stdout
    assert "version 2: 8.0 MB to 2 receivers" in proc.stdout
