"""The ``hotweights`` command line: a pinned surface, --help everywhere, --json where output is data,
non-zero exit codes on failure. Each subcommand runs for real, the way a user runs it.

When a subcommand lands, add it to SUBCOMMANDS (and give it text and JSON tests in its own test file).
"""

from __future__ import annotations

import argparse
import json
import textwrap

import pytest
import torch

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.cli import build_parser, main

from tests.conftest import ROOT, child_env, free_port, run_python

# name -> whether its output is data (so it must offer --json). Pinned: the test below fails when a
# subcommand appears or disappears without this list changing with it.
SUBCOMMANDS: dict[str, bool] = {
    "bench": True,
    "coord": False,  # a group: "coord gc" has --json, "coord serve" prints one JSON line
    "demo": True,
    "doctor": True,
    "kv-check": True,
    "metrics": True,
    "opt-check": True,
    "status": True,
    "publish": True,
    "receive": True,
    "relay": True,
}


def hotweights(*args: str, timeout: float = 120, env: dict | None = None):
    return run_python(["-m", "hotweights_trainer", *args], timeout=timeout, check=False, env=env)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_surface_is_pinned():
    assert set(_subparsers()) == set(SUBCOMMANDS)
    top = hotweights("--help")  # the real entry point, in its own process
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2 and "usage: hotweights" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help_and_json_where_data(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: hotweights {name}" in capsys.readouterr().out
    options = {opt for a in _subparsers()[name]._actions for opt in a.option_strings}
    assert ("--json" in options) == SUBCOMMANDS[name]


# ---------------------------------------------------------------- metrics
@pytest.fixture
def live_exporter(endpoint):
    """A publisher and a receiver in this process, one version synced, exporter on a free port."""
    port = free_port()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    with WeightPublisher(endpoint, config=SyncConfig(metrics_port=port, timeout_s=20)) as pub, \
            WeightReceiver(endpoint, model=torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)),
                           config=SyncConfig(timeout_s=20)) as rx:
        pub.wait_for_receivers(1, timeout=20)
        result = pub.publish(model)
        rx.wait_for_version(1)
        yield port, endpoint, result, rx


def test_metrics_text(live_exporter):
    port, endpoint, result, rx = live_exporter
    proc = hotweights("metrics", "--port", str(port))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"metrics from http://127.0.0.1:{port}/metrics"
    row = next(ln for ln in lines if ln.startswith("hotweights_bytes_total ") and endpoint in ln)
    assert row.split()[-1] == str(result.bytes_sent)
    row = next(ln for ln in lines if ln.startswith("hotweights_receiver_version ") and rx.receiver_id in ln)
    assert row.split()[-1] == "1"
    assert any(ln.startswith("hotweights_sync_seconds ") and "phase=apply" in ln and "count 1," in ln
               for ln in lines)


def test_metrics_json_and_env_default(live_exporter):
    port, endpoint, result, _ = live_exporter
    # No --port: HOTWEIGHTS_METRICS_PORT names the exporter, as for the syncing process itself.
    proc = hotweights("metrics", "--json", env=child_env(HOTWEIGHTS_METRICS_PORT=str(port)))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["url"] == f"http://127.0.0.1:{port}/metrics"
    samples = data["metrics"]["hotweights_bytes"]["samples"]
    assert [s["value"] for s in samples if s["labels"]["endpoint"] == endpoint] == [result.bytes_sent]
    version = data["metrics"]["hotweights_publisher_version"]["samples"]
    assert [s["value"] for s in version if s["labels"]["endpoint"] == endpoint] == [1]
    assert data["metrics"]["hotweights_sync_seconds"]["type"] == "histogram"


def test_metrics_failures_exit_non_zero(monkeypatch, capsys):
    dead = hotweights("metrics", "--port", str(free_port()), "--timeout", "5")
    assert dead.returncode == 1 and "cannot read metrics" in dead.stderr
    monkeypatch.delenv("HOTWEIGHTS_METRICS_PORT", raising=False)
    assert main(["metrics"]) == 2
    assert "HOTWEIGHTS_METRICS_PORT" in capsys.readouterr().err
    monkeypatch.setenv("HOTWEIGHTS_METRICS_PORT", "nine")
    assert main(["metrics"]) == 1  # ConfigError, named
    assert "HOTWEIGHTS_METRICS_PORT='nine'" in capsys.readouterr().err


# ---------------------------------------------------------------- bench
def test_bench_json_runs_the_real_suite():
    proc = hotweights("bench", "--quick", "--only", "core", "--json", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["ok"] and data["quick"] and [r["script"] for r in data["runs"]] == ["bench_core.py"]
    table = data["runs"][0]["tables"][0]
    methods = [row["method"] for row in table]
    assert "memcpy (torch copy_, pre-faulted)" in methods
    assert "hotweights shm:// publish->committed (steady)" in methods
    assert all(float(row["GB/s"]) > 0 for row in table)


TABLE_SCRIPT = """
import sys
print("| size | GB/s |")
print("|------|------|")
print("| 1 MiB | {} |".format(sys.argv[1:] == ["--quick"] and 1.5 or 9.9))
"""
FAILING_SCRIPT = "import sys\nprint('| a |')\nsys.exit(3)\n"
SLOW_SCRIPT = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a worker of its own
print("started", worker.pid, flush=True)
time.sleep(600)
"""
NO_QUICK_SCRIPT = "print('| x |')\n"


def _bench_dir(tmp_path, **scripts: str):
    d = tmp_path / "bench"
    d.mkdir()
    for name, body in scripts.items():
        (d / f"bench_{name}.py").write_text(textwrap.dedent(body))
    return d


def test_bench_text_prints_tables_and_fails_on_a_failing_script(tmp_path):
    d = _bench_dir(tmp_path, a_table=TABLE_SCRIPT, b_fails=FAILING_SCRIPT)
    proc = hotweights("bench", "--dir", str(d))
    assert proc.returncode == 1
    out = proc.stdout
    assert "## bench_a_table.py" in out and "| 1 MiB | 9.9 |" in out
    assert "## bench_b_fails.py" in out and "FAILED: bench_b_fails.py exited with status 3" in out
    assert out.rstrip().endswith("1 of 2 benchmarks ok; failed: bench_b_fails.py")


def test_bench_list_and_unknown_name(tmp_path, capsys):
    d = _bench_dir(tmp_path, a_table=TABLE_SCRIPT, b_fails=FAILING_SCRIPT)
    assert main(["bench", "--dir", str(d), "--list"]) == 0
    # TABLE_SCRIPT reads --quick, FAILING_SCRIPT does not.
    assert capsys.readouterr().out.split() == ["bench_a_table.py", "bench_b_fails.py", "(no", "--quick)"]
    assert main(["bench", "--dir", str(d), "--only", "nope"]) == 1  # ConfigError naming what exists
    err = capsys.readouterr().err
    assert "no benchmark named nope" in err and "have: a_table, b_fails" in err


def test_bench_quick_skips_scripts_without_it_and_parses_tables(tmp_path):
    quick_table = TABLE_SCRIPT.replace("print(\"| size", "# --quick\nprint(\"| size")
    d = _bench_dir(tmp_path, a_table=quick_table, c_plain=NO_QUICK_SCRIPT)
    proc = hotweights("bench", "--dir", str(d), "--quick", "--json")
    assert proc.returncode == 0, proc.stderr
    runs = {r["script"]: r for r in json.loads(proc.stdout)["runs"]}
    assert runs["bench_a_table.py"]["tables"] == [[{"size": "1 MiB", "GB/s": "1.5"}]]
    assert runs["bench_c_plain.py"]["skipped"] == "declares no --quick option"


def test_bench_deadline_kills_the_script_and_its_workers(tmp_path):
    import time

    d = _bench_dir(tmp_path, slow=SLOW_SCRIPT)
    t0 = time.monotonic()
    proc = hotweights("bench", "--dir", str(d), "--timeout", "3", "--json", timeout=120)
    assert time.monotonic() - t0 < 90
    assert proc.returncode == 1
    run = json.loads(proc.stdout)["runs"][0]
    assert "did not finish within 3s" in run["error"] and run["output"].startswith("started")
    worker = int(run["output"].split()[1])
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the script's worker process survived the deadline"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bench_finds_the_checkout_suite_from_anywhere(tmp_path):
    proc = run_python(["-m", "hotweights_trainer", "bench", "--list", "--json"], cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dir"] == str(ROOT / "bench")
    assert {"script": "bench_core.py", "quick": True} in data["benchmarks"]
