"""``hotweights doctor``: which transports this machine offers, their capabilities, and what auto picks.

For every transport: whether it can run here and why not, its capability attributes and their
limits. Then the inputs of auto-selection as seen from this process and the choice for each kind of
endpoint. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from typing import Any

from ._common import add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="show which transports work here and what auto-selection picks",
                       description=__doc__)
    add_json_flag(p)
    p.set_defaults(func=run)


def _probe_torch() -> tuple[bool, str]:
    import torch.distributed as dist

    from ..transports.torch_backends import local_backends

    if not dist.is_available():
        return False, "torch.distributed is not available in this torch build"
    backends = local_backends()
    ok = [b for b, why in backends.items() if why == "ok"]
    detail = "; ".join(f"{b}: {why}" for b, why in backends.items())
    return bool(ok), f"backends {', '.join(ok) or 'none'} ({detail})"


def _probe_mpi() -> tuple[bool, str]:
    if importlib.util.find_spec("mpi4py") is None:
        return False, "mpi4py not installed (pip install 'hotweights_trainer[mpi]')"
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    try:
        from mpi4py import MPI
    except Exception as exc:  # noqa: BLE001 - a broken MPI install is exactly what doctor reports
        return False, f"mpi4py cannot load MPI: {exc}"
    level = MPI.Query_thread()
    names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized",
             MPI.THREAD_MULTIPLE: "multiple"}
    lib = MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
    ok = level >= MPI.THREAD_MULTIPLE and launcher is not None
    why = f"{lib}; thread level {names.get(level, level)}; launcher {launcher or 'not on PATH'}"
    return ok, why


def _probe_ucx() -> tuple[bool, str]:
    from ..transports.select import ucx_module

    mod = ucx_module()
    if mod is None:
        return False, "neither ucx-py (ucp) nor ucxx is importable (pip install 'hotweights_trainer[ucx]')"
    binding = "ucx-py asyncio API" if mod == "ucp" else "ucxx core API"
    perftest = shutil.which("ucx_perftest")
    return True, f"{mod} ({binding}); ucx_perftest {perftest or 'not installed'}"


def _probe_shm() -> tuple[bool, str]:
    from ..transports import shm

    if shm._posixshmem is None:
        return False, "no POSIX shared memory on this platform"
    return True, "POSIX shared memory (/dev/shm)"


def _probe_cuda_ipc() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device visible (torch.cuda.is_available() is False)"
    from ..gpu.topology import probe

    topo = probe()
    return True, f"{topo.devices} CUDA device(s); {topo.source}"


PROBES = {"shm": _probe_shm, "torch": _probe_torch, "mpi": _probe_mpi, "ucx": _probe_ucx,
          "cuda_ipc": _probe_cuda_ipc}


def collect() -> dict[str, Any]:
    from ..transports import REGISTRY, SCHEMES, parse_endpoint, publisher_class
    from ..transports.base import capabilities
    from ..transports.select import decide, gather

    transports: dict[str, Any] = {}
    for name in sorted(REGISTRY):
        probe = PROBES.get(name)
        try:
            ok, why = probe() if probe else (True, "")
        except Exception as exc:  # noqa: BLE001 - doctor reports every failure instead of dying on it
            ok, why = False, f"{type(exc).__name__}: {exc}"
        transports[name] = {"available": ok, "detail": why, "endpoints": [s + "://" for s in SCHEMES[name]],
                            **capabilities(publisher_class(name))}
    auto: dict[str, Any] = {}
    inputs = None
    # 192.0.2.10 (TEST-NET-1) stands for "some other host"; it is never contacted.
    for ep, real in (("shm://NAME", "shm://policy"), ("tcp://127.0.0.1:PORT", "tcp://127.0.0.1:29500"),
                     ("tcp://REMOTE-HOST:PORT", "tcp://192.0.2.10:29500"), ("mpi://", "mpi://")):
        endpoint = parse_endpoint(real)
        inputs = gather(endpoint, "publisher")
        choice, reason = decide(inputs)
        auto[ep] = {"choice": choice, "reason": reason}
    from dataclasses import asdict

    facts = asdict(inputs) if inputs else {}
    for k in ("endpoint_scheme", "role", "loopback"):
        facts.pop(k, None)
    return {"transports": transports, "auto_inputs": facts, "auto": auto}


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print("transports:")
    for name, t in report["transports"].items():
        mark = "yes" if t["available"] else "NO "
        print(f"  {name:<6} {mark}  {', '.join(t['endpoints'])}  {t['detail']}")
        caps = [c for c in ("zero_copy", "multi_receiver", "cross_host", "late_join", "pipelined",
                            "survives_receiver_death") if t[c]]
        print(f"         capabilities: {', '.join(caps)}")
        for cap, why in t["limits"].items():
            print(f"         no {cap}: {why}")
    print("auto-selection inputs here: " + ", ".join(f"{k}={v}" for k, v in report["auto_inputs"].items()))
    for ep, d in report["auto"].items():
        print(f"  auto for {ep:<24} -> {d['choice']:<6} ({d['reason']})")
    return 0
