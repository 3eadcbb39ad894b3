"""What the library reads from the process environment besides its settings.

The config package is the only place that reads ``os.environ``: settings through
``SyncConfig.from_env()``, and here the launcher's variables and the environment handed to the
processes the library starts.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

# Environment variables set by MPI launchers (mpirun/mpiexec/srun with PMI) in every process they start.
MPI_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS",
                          "MV2_COMM_WORLD_SIZE")


def child_environ(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, for the processes the library starts (fleet hosts)."""
    return {**os.environ, **extra}


def launcher_facts(environ: Mapping[str, str] | None = None) -> dict[str, Optional[str]]:
    """What the process launcher says about this process (for transport auto-selection).

    Returns ``{"mpi_launcher": "VAR=value" or None}``.
    """
    env = os.environ if environ is None else environ
    hit = next((f"{v}={env[v]}" for v in MPI_LAUNCHER_VARIABLES if v in env), None)
    return {"mpi_launcher": hit}


__all__ = ["MPI_LAUNCHER_VARIABLES", "child_environ", "launcher_facts"]
