"""Shared test helpers: subprocess environment, ports for other programs, unique endpoints, required extras.

``HOTWEIGHTS_REQUIRE`` (a comma list, set in CI) turns a skip for a missing optional part into a
failure, so CI can never go green by skipping the MPI, UCX, Redis, DeepSpeed or TRL tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

# Imported first, so that it records the environment the tests start with.
from tests.procs import warm as warm_start

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {x.strip() for x in os.environ.get("HOTWEIGHTS_REQUIRE", "").split(",") if x.strip()}

_PROBES = {
    "mpi": lambda: importlib.util.find_spec("mpi4py") is not None and shutil.which("mpirun") is not None,
    "ucx": lambda: importlib.util.find_spec("ucxx") is not None or importlib.util.find_spec("ucp") is not None,
    "redis": lambda: importlib.util.find_spec("redis") is not None and shutil.which("redis-server") is not None,
    "deepspeed": lambda: importlib.util.find_spec("deepspeed") is not None,
    "trl": lambda: importlib.util.find_spec("trl") is not None,
    "hf": lambda: importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("accelerate") is not None,
    "vllm": lambda: importlib.util.find_spec("vllm") is not None,
    "peft": lambda: importlib.util.find_spec("peft") is not None
    and importlib.util.find_spec("transformers") is not None,
    "netns": lambda: _netns_available(),
}


def _netns_available() -> bool:
    """Network namespaces, veth pairs, a bridge and tbf can be created here (root, iproute2)."""
    from hotweights_trainer.relay.netns import available

    if "ok" not in _NETNS:
        _NETNS["ok"], _NETNS["why"] = available()
    return bool(_NETNS["ok"])


_NETNS: dict[str, object] = {}


def require(part: str) -> None:
    """Skip the calling test when ``part`` is unavailable -- or fail, when CI requires it."""
    if _PROBES[part]():
        return
    why = f": {_NETNS['why']}" if part == "netns" else ""
    if part in REQUIRED:
        pytest.fail(f"{part} is required here (HOTWEIGHTS_REQUIRE) but not available{why}")
    pytest.skip(f"{part} not available{why}")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout first on the path, no hub access, and this
    interpreter's environment first on ``PATH``, as in an activated venv.

    The last one also keeps every child on one toolchain: DeepSpeed JIT-builds its CPU shm op with
    whichever ``ninja`` comes first on ``PATH``, and a venv's ninja and the system's record build
    commands differently, so children alternating between the two rebuilt the op (tens of seconds of
    compiling) again and again.
    """
    return environment_for_children(os.environ, extra)


def environment_for_children(base, extra: dict) -> dict[str, str]:
    """:func:`child_env` built on ``base`` instead of this process's environment."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    venv_bin = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env["PATH"] = os.pathsep.join([venv_bin] + rest)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    env.update(extra)
    return env


def free_port() -> int:
    """A port that was free a moment ago, for programs that must be told their port before they start
    and cannot report one they picked: torchrun/accelerate/deepspeed rendezvous (--master_port),
    redis-server, the Prometheus exporter (HOTWEIGHTS_METRICS_PORT=0 means "off"), a vLLM server --
    or a port nobody listens on.

    Never for a hotweights publisher or coordinator: those take ``tcp://HOST:0`` and report the port
    they bound (``pub.endpoint``, ``CoordServer.port``), which cannot race another test for it.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(code_or_args, *, timeout: float = 120, env: dict | None = None, check: bool = True,
               warm: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``python -c code`` (str) or ``python args...`` (list) in a child process with a deadline.

    The child is started warm (tests/procs/warm.py) unless ``warm`` is False: for a test about what
    a real interpreter does when it starts or exits."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    run = warm_start.run if warm else subprocess.run
    proc = run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
               env=env or child_env(), cwd=kw.pop("cwd", ROOT), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def in_process_llm(model_dir, **options):
    """A real vLLM engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: started in seconds)
    with the hotweights backend and small test settings, which ``options`` extend or replace; shut
    down on exit.

    vLLM sets process-wide environment variables while it starts (``LD_PRELOAD`` of its OpenMP
    library, ``LOCAL_WORLD_SIZE``, its worker start method, ...). They are undone on exit, so that
    they never reach the child processes of the tests that this worker runs afterwards.
    """
    saved = dict(os.environ)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        settings = {"dtype": "float32", "kv_cache_memory_bytes": 16 << 20, "max_model_len": 128,
                    "enforce_eager": True,
                    "weight_transfer_config": WeightTransferConfig(backend="hotweights"), **options}
        llm = LLM(str(model_dir), **settings)
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def endpoint() -> str:
    """A fresh shm:// endpoint name per test."""
    return f"shm://t-{uuid.uuid4().hex[:12]}"


def pytest_addoption(parser):
    parser.addoption("--cold-start", action="store_true",
                     help="start every Python child as a fresh interpreter (no warm starts: "
                          "tests/procs/warm.py)")


def pytest_configure(config):
    if config.getoption("--cold-start"):
        warm_start.enabled = False


def pytest_collection_modifyitems(config, items):
    """Files whose tests are all ``slow`` first (fewest tests first), then files with some, then the rest.

    ``make test`` hands whole files to two workers in this order (``--no-loadscope-reorder``; by
    default xdist starts the files with the most tests first, which put the one-test files that run
    vLLM or DeepSpeed for a minute last, one worker running them alone at the end).
    """
    total: dict = {}
    slow: dict = {}
    for item in items:
        total[item.path] = total.get(item.path, 0) + 1
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    # Among equals, files with fewer tests first: there one test is one long launch.
    items.sort(key=lambda item: (-slow[item.path] / total[item.path], total[item.path]))  # stable
