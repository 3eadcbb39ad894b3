"""Configuration: every ``HOTWEIGHTS_*`` knob, typed, grouped in sections, validated, read once.

- :mod:`.schema` -- how a setting is declared (field metadata: flat name, bounds, choices, unit,
  where it applies) and the one validator and parser that enforce it;
- :mod:`.sections` -- one frozen dataclass per part of the library, a docstring under every field;
- :mod:`.sync` -- ``SyncConfig``: the sections together, each setting also under its flat name,
  ``from_env()``;
- :mod:`.environ` -- the launcher's variables and the environment of child processes.

``docs/TUNING.md`` is generated from these (``python scripts/gen_tuning_doc.py``), so the two never
drift. This package is the only place that reads ``os.environ``; everything else receives a
``SyncConfig``.
"""

from __future__ import annotations

from .environ import MPI_LAUNCHER_VARIABLES, child_environ, launcher_facts
from .schema import ENV_PREFIX, Section, parse_int_list
from .sections import (DTYPE_NAMES, SECTIONS, WINDOWED, AsyncPushConfig, ControlConfig, CoreConfig,
                       CudaIpcConfig, DeltaSyncConfig, GpuConfig, KVConfig, MetricsConfig, MpiConfig,
                       OptimConfig, PeftSyncConfig, ReceiversConfig, TorchConfig, TransportName, UcxConfig,
                       WindowConfig)
from .sync import (NON_CONFIG_VARIABLES, SETTINGS, Setting, SyncConfig, default_of, field_docs,
                   field_sections, section_field_docs, section_title, setting)

__all__ = [
    "SyncConfig", "Setting", "SETTINGS", "SECTIONS", "Section", "setting", "field_docs", "field_sections",
    "section_field_docs", "section_title", "default_of", "parse_int_list", "NON_CONFIG_VARIABLES",
    "ENV_PREFIX",
    "DTYPE_NAMES", "TransportName", "WINDOWED", "MPI_LAUNCHER_VARIABLES", "child_environ", "launcher_facts",
    "CoreConfig", "ReceiversConfig", "DeltaSyncConfig", "AsyncPushConfig", "PeftSyncConfig", "WindowConfig",
    "CudaIpcConfig", "TorchConfig", "GpuConfig", "MpiConfig", "UcxConfig", "ControlConfig", "MetricsConfig",
    "KVConfig", "OptimConfig",
]
