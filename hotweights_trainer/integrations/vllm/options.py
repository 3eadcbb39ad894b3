"""What the ``"hotweights"`` backend accepts from vLLM's weight-transfer calls (pure parsing, no vLLM).

vLLM hands every backend plain dicts: ``init_info`` once per engine, ``update_info`` per update. They
may have crossed HTTP or msgpack, so every field is checked here and a bad one is a
:class:`~hotweights_trainer.errors.ConfigError` that names it.

``init_info``:

==================  ==========================================================================
key                 meaning
==================  ==========================================================================
``endpoint``        required: the hotweights endpoint the trainer publishes on (``shm://policy``)
any SyncConfig      overrides of that field for the receivers in this engine, by field name
field name          (``timeout_s``, ``delta``, ...); the environment gives the rest
==================  ==========================================================================

``update_info``:

==================  ==========================================================================
``version``         required int >= 1: apply the newest committed version >= it
``timeout_s``       optional number > 0: deadline of this update (default: the config's ``timeout_s``)
==================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ...config import SyncConfig
from ...errors import ConfigError


@dataclass(frozen=True)
class InitOptions:
    endpoint: str
    config: SyncConfig


@dataclass(frozen=True)
class UpdateOptions:
    version: int
    timeout_s: Optional[float] = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_init_info(info: Any, environ: Optional[Mapping[str, str]] = None) -> InitOptions:
    if not isinstance(info, Mapping):
        raise ConfigError(f"hotweights init_info must be a dict, got {type(info).__name__}")
    endpoint = info.get("endpoint")
    problems: list[str] = []
    if not isinstance(endpoint, str) or not endpoint:
        problems.append(f"hotweights init_info needs 'endpoint' (e.g. 'shm://policy'), got {endpoint!r}")
    known = {f.name for f in dataclasses.fields(SyncConfig)}
    overrides = {k: v for k, v in info.items() if k != "endpoint"}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        problems.append(f"hotweights init_info has unknown key(s) {', '.join(map(repr, unknown))}: "
                        f"expected 'endpoint' and SyncConfig field names")
    if problems:
        raise ConfigError(problems)
    return InitOptions(endpoint=endpoint, config=SyncConfig.from_env(environ, **overrides))


def parse_update_info(info: Any) -> UpdateOptions:
    if not isinstance(info, Mapping):
        raise ConfigError(f"hotweights update_info must be a dict, got {type(info).__name__}")
    problems: list[str] = []
    unknown = sorted(set(info) - {"version", "timeout_s"})
    if unknown:
        problems.append(f"hotweights update_info has unknown key(s) {', '.join(map(repr, unknown))}: "
                        "expected 'version' and optionally 'timeout_s'")
    version = info.get("version")
    if not _is_int(version) or version < 1:
        problems.append(f"hotweights update_info needs 'version', an integer >= 1, got {version!r}")
    timeout = info.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        problems.append(f"hotweights update_info 'timeout_s' must be a number > 0, got {timeout!r}")
    if problems:
        raise ConfigError(problems)
    return UpdateOptions(version=version, timeout_s=None if timeout is None else float(timeout))
