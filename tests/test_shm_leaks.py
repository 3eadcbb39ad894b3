"""Nothing of ours stays in /dev/shm, however a publisher's process ends.

Each test lists /dev/shm (only the blocks of its own endpoint) before and after real processes:

* a script that exits without ``close()``, one that dies of an exception, a Trainer run with
  ``close_on_train_end=False``: the publisher is closed at interpreter exit;
* SIGKILL and ``os._exit`` run no code of ours: the next hotweights process that starts (a receiver
  on another endpoint, ``hotweights coord gc``) reclaims the blocks of the dead owner;
* blocks of a live publisher are never reclaimed, and an owner is recognised by PID *and* start
  time, so a reused PID does not keep dead blocks alive (nor does a dead PID free live ones).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from hotweights_trainer.transports import shm_blocks
from tests.conftest import ROOT, child_env, require, run_python
from tests.procs.spawn import Proc

PUBLISHER = r"""
import json, os, signal, sys
import torch
from hotweights_trainer import SyncConfig, WeightPublisher

endpoint, how = sys.argv[1], sys.argv[2]
name = endpoint.split("://")[1]
pub = WeightPublisher(endpoint, config=SyncConfig.from_env(bucket_mb=1, timeout_s=20))
torch.manual_seed(0)
pub.publish({"a": torch.randn(300_000), "b": torch.randn(300_000)})  # several 1 MiB buckets
blocks = sorted(f for f in os.listdir("/dev/shm") if f.startswith(f"hwt.{name}."))
print(json.dumps({"blocks": blocks}), flush=True)
if how == "raise":
    raise RuntimeError("the training loop failed")
if how == "os_exit":
    os._exit(0)  # what launched ranks do: no atexit, no finally
if how == "wait":  # until SIGKILL, or SIGUSR1 for a normal exit (still without close())
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
    signal.pause()
"""

RECEIVER_STARTS = r"""
import sys
from hotweights_trainer import SyncConfig, WeightReceiver
WeightReceiver(sys.argv[1], apply=lambda items: None, config=SyncConfig(timeout_s=5)).close()
"""


def blocks(endpoint: str) -> set[str]:
    prefix = shm_blocks.block_prefix(endpoint.split("://")[1])
    return {f for f in os.listdir(shm_blocks.SHM_DIR) if f.startswith(prefix)}


def other_endpoint(endpoint: str) -> str:
    return endpoint + "-other"


def publisher(endpoint: str, how: str) -> subprocess.CompletedProcess:
    # A real interpreter start and exit: how it exits is what these tests are about.
    return run_python(["-c", PUBLISHER, endpoint, how], timeout=120, check=False, warm=False)


def published_blocks(stdout: str) -> list[str]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert rows, "the publisher printed no block list"
    return rows[0]["blocks"]


@pytest.mark.parametrize("how, code", [("return", 0), ("raise", 1)])
def test_exit_without_close_leaves_nothing(endpoint, how, code):
    assert blocks(endpoint) == set()
    proc = publisher(endpoint, how)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(published_blocks(proc.stdout)) >= 2  # there was something to leak
    if how == "raise":
        assert "RuntimeError: the training loop failed" in proc.stderr
    assert blocks(endpoint) == set()


def test_sigkill_blocks_are_reclaimed_by_the_next_process_that_starts(endpoint):
    assert blocks(endpoint) == set()
    pub = Proc(["-c", PUBLISHER, endpoint, "wait"], warm=False)
    try:
        made = set(pub.next(120)["blocks"])
        assert len(made) >= 2
        os.kill(pub.p.pid, signal.SIGKILL)
        pub.wait(10)
        assert blocks(endpoint) <= made
    finally:
        pub.kill()
    # A receiver of another fleet: any hotweights process that starts frees what dead ones left.
    run_python(["-c", RECEIVER_STARTS, other_endpoint(endpoint)], timeout=120)
    assert blocks(endpoint) == set()


def test_os_exit_blocks_are_reclaimed_by_coord_gc(endpoint):
    assert blocks(endpoint) == set()
    proc = publisher(endpoint, "os_exit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = set(published_blocks(proc.stdout))
    assert made and blocks(endpoint) <= made
    gc = run_python(["-m", "hotweights_trainer", "coord", "gc", "--json"], timeout=120)
    removed = json.loads(gc.stdout)["removed"]
    assert isinstance(removed, list)  # made's names are there unless a process started meanwhile got them
    assert blocks(endpoint) == set()
    text = run_python(["-m", "hotweights_trainer", "coord", "gc"], timeout=120).stdout
    assert "shared-memory block(s) of dead publishers removed" in text


RECEIVER_GETS_VERSION = r"""
import json, sys
from hotweights_trainer import SyncConfig, WeightReceiver
seen = {}
with WeightReceiver(sys.argv[1], apply=lambda items: seen.update(items), config=SyncConfig(timeout_s=30)) as rx:
    print(json.dumps({"version": rx.wait_for_version(1), "names": sorted(seen)}), flush=True)
"""


def receiver_gets_version_1(endpoint: str) -> None:
    got = run_python(["-c", RECEIVER_GETS_VERSION, endpoint], timeout=120)
    assert json.loads(got.stdout.splitlines()[-1]) == {"version": 1, "names": ["a", "b"]}


def test_exit_linger_serves_the_last_version_to_a_late_receiver_then_frees_everything(endpoint):
    # The script ends before the inference side connects; with HOTWEIGHTS_EXIT_LINGER_S its publisher,
    # closed at exit, still hands the last version over (without it, exit closes at once).
    pub = Proc(["-c", PUBLISHER, endpoint, "return"], env=child_env(HOTWEIGHTS_EXIT_LINGER_S="60"),
               warm=False)
    try:
        assert pub.next(120)["blocks"]
        receiver_gets_version_1(endpoint)
        assert pub.wait(60) == 0, pub.stderr()
    finally:
        pub.kill()
    assert blocks(endpoint) == set()


def test_blocks_of_a_live_publisher_are_never_reclaimed(endpoint):
    pub = Proc(["-c", PUBLISHER, endpoint, "wait"], warm=False)
    try:
        made = set(pub.next(120)["blocks"])
        # Other processes start meanwhile: a publisher of another fleet and the janitor command.
        run_python(["-c", PUBLISHER, other_endpoint(endpoint), "return"], timeout=120)
        gc = run_python(["-m", "hotweights_trainer", "coord", "gc", "--json"], timeout=120)
        assert not made & set(json.loads(gc.stdout)["removed"])
        assert blocks(endpoint) == made
        # Still usable: a receiver that joins now gets the version from those blocks.
        receiver_gets_version_1(endpoint)
        os.kill(pub.p.pid, signal.SIGUSR1)  # a normal exit, without close()
        assert pub.wait(60) == 0, pub.stderr()
    finally:
        pub.kill()
    assert blocks(endpoint) == set()


def _fake_block(name: str) -> str:
    """A real (empty) shared-memory block under ``name``, as a publisher would have left it."""
    fd = shm_blocks._posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    return name


def test_owner_is_recognised_by_pid_and_start_time_not_pid_alone(endpoint):
    name = endpoint.split("://")[1]
    me = shm_blocks.current_owner()
    assert me.start > 0 and me.ns > 0, "this test needs /proc"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout.strip()
    prefix = shm_blocks.block_prefix(name)
    reused = _fake_block(f"{prefix}{me.pid}_{me.start - 1}_{me.ns}.1")  # our PID, someone else's start
    mine = _fake_block(shm_blocks.block_name(name, 2))
    gone = _fake_block(f"{prefix}{dead}_{me.start}_{me.ns}.3")
    legacy_dead = _fake_block(f"{prefix}{dead}.4")  # named by an earlier release: PID only
    legacy_live = _fake_block(f"{prefix}{me.pid}.5")
    elsewhere = _fake_block(f"{prefix}{dead}_{me.start}_{me.ns + 1}.6")  # another PID namespace
    try:
        assert shm_blocks.parse_block_name(mine).owner == me
        assert shm_blocks.parse_block_name(reused).endpoint == name
        removed = set(shm_blocks.reclaim_dead_blocks(name))
        assert removed == {reused, gone, legacy_dead}
        assert blocks(endpoint) == {mine, legacy_live, elsewhere}
    finally:
        for entry in blocks(endpoint):
            shm_blocks.unlink_block(entry)
    assert blocks(endpoint) == set()


TRAINER = r"""
import sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from hotweights_trainer import HotweightsCallback, SyncConfig

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(8)]
cb = HotweightsCallback(sys.argv[1], every_n_steps=1, close_on_train_end=False, config=SyncConfig(timeout_s=30))
args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to=[], max_steps=2,
                         per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
assert [r.version for r in cb.results] == [1, 2], cb.results
print(sorted(f for f in __import__("os").listdir("/dev/shm") if f.startswith("hwt." + sys.argv[1][6:] + ".")))
"""


@pytest.mark.slow
def test_trainer_run_that_keeps_its_publisher_open_leaves_nothing(endpoint, tmp_path):
    require("hf")
    assert blocks(endpoint) == set()
    proc = run_python(["-c", TRAINER, endpoint, str(tmp_path / "out")], timeout=300,
                      env=child_env(TOKENIZERS_PARALLELISM="false"), warm=False)
    assert "hwt." in proc.stdout  # the run held blocks when training ended
    assert blocks(endpoint) == set()
