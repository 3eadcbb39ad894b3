"""hotweights_trainer: fast, bit-exact, all-or-nothing weight sync from trainer ranks to inference ranks.

Stable public names::

    from hotweights_trainer import (SyncConfig, WeightPublisher, WeightReceiver, PublishResult,
                                    HotweightsCallback, HotweightsError)

Every error class of :mod:`hotweights_trainer.errors` is exported here too, so callers can catch
what they receive (``ClosedError``, ``AuthError``, ``ShardingMismatchError``, ...) by its own name.
"""

from __future__ import annotations

from typing import Any

from .config import SyncConfig
from .errors import (AuthError, ClosedError, ConfigError, CoordinatorError, CorruptBucketError,
                     EndpointError, EngineError, FencedError, HotweightsError, InferenceUpdateError,
                     KVCacheError, KVMigrationError, ManifestMismatchError, MetricsError, NotLeaderError,
                     OptimizerPolicyError, PeerLostError, PeftModeError, RelayError, ShardingMismatchError,
                     SidecarError, StaleVersionError, SyncTimeoutError, TransportUnavailableError,
                     UnsupportedAdapterError, VersionAbortedError, WireFormatError)
from .publisher import PublishResult, WeightPublisher
from .receiver import WeightReceiver

__version__ = "0.1.0"

__all__ = [
    "SyncConfig", "WeightPublisher", "WeightReceiver", "PublishResult", "HotweightsCallback",
    "HotweightsError", "ConfigError", "EndpointError", "WireFormatError", "CorruptBucketError",
    "ManifestMismatchError", "SyncTimeoutError", "PeerLostError", "VersionAbortedError",
    "TransportUnavailableError", "ClosedError", "AuthError", "ShardingMismatchError", "CoordinatorError",
    "FencedError", "NotLeaderError", "RelayError", "InferenceUpdateError", "KVMigrationError", "KVCacheError",
    "OptimizerPolicyError", "SidecarError", "MetricsError", "UnsupportedAdapterError", "PeftModeError",
    "EngineError", "StaleVersionError", "__version__",
]


def __getattr__(name: str) -> Any:
    # transformers is an optional, heavy import: load the callback only when asked for.
    if name == "HotweightsCallback":
        from .integrations.hf_trainer import HotweightsCallback

        return HotweightsCallback
    raise AttributeError(f"module 'hotweights_trainer' has no attribute {name!r}")
