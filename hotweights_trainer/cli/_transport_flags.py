"""Flags shared by the subcommands that move weights (``publish``, ``receive``), and the config they build."""

from __future__ import annotations

import argparse
from typing import Optional

from ..config import SyncConfig

TRANSPORTS = ("auto", "shm", "torch", "mpi", "ucx", "cuda_ipc")


def add_transport_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True, help="shm://NAME, tcp://HOST:PORT or mpi://")
    p.add_argument("--transport", choices=TRANSPORTS, default=None,
                   help="transport (default: HOTWEIGHTS_TRANSPORT, else auto)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds of every wait "
                   "(default: HOTWEIGHTS_TIMEOUT_S)")
    p.add_argument("--window", type=int, default=None,
                   help="mpi: buckets kept in flight (publisher) / broadcasts posted ahead (receivers)")
    p.add_argument("--mpi-chunk-mb", type=int, default=None,
                   help="mpi: MiB per non-blocking broadcast (set on the publisher; receivers follow it)")


def config_from_args(args: argparse.Namespace, **extra: Optional[object]) -> SyncConfig:
    """``SyncConfig.from_env`` with the flags given on the command line winning."""
    overrides = {"transport": args.transport, "timeout_s": args.timeout, "mpi_window": args.window,
                 "mpi_chunk_mb": args.mpi_chunk_mb, **extra}
    return SyncConfig.from_env(**{k: v for k, v in overrides.items() if v is not None})


def mpi_rank() -> Optional[int]:
    """This process's rank when running under an MPI launcher (else None); imports MPI only then."""
    from ..config import launcher_facts

    if not launcher_facts()["mpi_launcher"]:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD.Get_rank()
