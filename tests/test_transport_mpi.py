"""The conformance cases for the mpi transport, under a real ``mpirun`` (Open MPI).

One job runs the round trip, several receivers, a late joiner, a corrupted bucket and the byte cap
(tests/procs/tx_mpi.py); a second one kills a receiver rank mid-version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, child_env, require

JOB_TIMEOUT = 180


def _mpirun(n: int, case: str) -> tuple[subprocess.CompletedProcess, list[dict], float]:
    cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n),
           sys.executable, "-m", "tests.procs.tx_mpi", "--case", case]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=child_env(), cwd=ROOT)
    return proc, json_objects(proc.stdout), time.monotonic() - t0


def json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text`` (ranks write concurrently: two objects can share a line)."""
    out, pos, dec = [], 0, json.JSONDecoder()
    while (start := text.find("{", pos)) >= 0:
        try:
            obj, pos = dec.raw_decode(text, start)
            out.append(obj)
        except json.JSONDecodeError:
            pos = start + 1
    return out


@pytest.fixture(scope="module")
def job():
    require("mpi")
    proc, lines, _ = _mpirun(4, "all")
    assert proc.returncode == 0, f"mpirun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return lines


def _published(lines, v):
    return next(x for x in lines if x.get("pub") == v)


def _applied(lines, rank, v):
    return next((x for x in lines if x.get("rank") == rank and x.get("version") == v), None)


def test_mpi_round_trip_and_several_receivers(job):
    caps = next(x["capabilities"] for x in job if "capabilities" in x)
    assert caps["transport"] == "mpi" and caps["multi_receiver"] and caps["pipelined"]
    for v in (1, 2):
        pub = _published(job, v)
        assert pub["receivers"] == 2 and pub["buckets"] >= 3
        for rank in (1, 2):
            assert _applied(job, rank, v)["digests"] == pub["digests"]


def test_mpi_late_joiner(job):
    assert _applied(job, 3, 1) is None  # it never saw version 1 ...
    assert _applied(job, 3, 2)["digests"] == _published(job, 2)["digests"]  # ... but caught up on 2
    pub3 = _published(job, 3)
    assert pub3["receivers"] == 3
    for rank in (1, 2, 3):
        assert _applied(job, rank, 3)["digests"] == pub3["digests"]


def test_mpi_corrupted_bucket_is_rejected(job):
    corrupt = next(x for x in job if "corrupt" in x)
    assert corrupt["corrupt"] == "CorruptBucketError" and "checksum" in corrupt["message"]
    for rank in (1, 2, 3):
        assert _applied(job, rank, 4) is None
        assert any(x.get("rank") == rank and x.get("error") == "CorruptBucketError" for x in job)
        assert _applied(job, rank, 5)["digests"] == _published(job, 5)["digests"]


def test_mpi_inflight_cap_is_never_exceeded(job):
    rec = next(x for x in job if "stats" in x)
    s = rec["stats"]
    assert s["buckets_posted"] >= 10 and s["inflight_bytes"] == 0
    assert 0 < s["bytes_high"] <= rec["cap"]
    assert 1 <= s["buckets_high"] <= rec["window"]


def test_mpi_receiver_killed_mid_version_ends_the_job_bounded():
    """MPI's fault model: a dead rank ends the whole job. Bounded -- never a hang."""
    require("mpi")
    from hotweights_trainer.transports.mpi import MpiPublisher

    assert not MpiPublisher.survives_receiver_death and "mpirun" in MpiPublisher.limits["survives_receiver_death"]
    proc, lines, seconds = _mpirun(3, "kill")
    assert proc.returncode != 0
    assert seconds < JOB_TIMEOUT - 30
    assert _published(lines, 1)["receivers"] == 2
    assert any(x.get("dying") == [2, 2] for x in lines)
    assert "signal 9" in proc.stderr or "Killed" in proc.stderr or "killed" in proc.stderr, proc.stderr[-2000:]
