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
``lora_dir``        adapter mode (``peft_mode=adapter``): a directory on the engine's host where
                    rank 0 writes each version as a peft adapter directory ``v<version>``;
                    needs ``lora_config``, and an engine started with ``enable_lora=True``
``lora_config``     with ``lora_dir``: the trainer's ``LoraConfig`` as a dict
                    (``peft_config["default"].to_dict()``, sets as lists); it is the
                    ``adapter_config.json`` written and the layout versions are checked against
``lora_adapter``    with ``lora_dir``: the trainer's adapter name (default ``"default"``)
==================  ==========================================================================

``update_info``:

==================  ==========================================================================
``version``         required int >= 1: apply the newest committed version >= it
``timeout_s``       optional number > 0: deadline of this update (default: the config's ``timeout_s``)
==================  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ...config import SyncConfig
from ...errors import ConfigError


LORA_KEYS = ("lora_dir", "lora_config", "lora_adapter")
"""Backend keys of adapter mode (vLLM LoRA adapters, see :mod:`.lora`); not SyncConfig fields."""


@dataclass(frozen=True)
class LoraOptions:
    directory: str
    config: dict[str, Any]
    adapter: str = "default"


@dataclass(frozen=True)
class InitOptions:
    endpoint: str
    config: SyncConfig
    lora: Optional[LoraOptions] = None
    """Set in adapter mode: versions become vLLM LoRA adapters instead of base weights."""


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
    known = set(SyncConfig.field_names())
    overrides = {k: v for k, v in info.items() if k != "endpoint" and k not in LORA_KEYS}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        problems.append(f"hotweights init_info has unknown key(s) {', '.join(map(repr, unknown))}: "
                        f"expected 'endpoint', {', '.join(map(repr, LORA_KEYS))} and SyncConfig field names")
    lora = _parse_lora(info, problems)
    if problems:
        raise ConfigError(problems)
    return InitOptions(endpoint=endpoint, config=SyncConfig.from_env(environ, **overrides), lora=lora)


def _parse_lora(info: Mapping[str, Any], problems: list[str]) -> Optional[LoraOptions]:
    directory, config, adapter = (info.get(k) for k in LORA_KEYS)
    if directory is None:
        if config is not None or adapter is not None:
            problems.append("hotweights init_info has 'lora_config'/'lora_adapter' without 'lora_dir': "
                            "adapter mode needs the directory the adapters are written to")
        return None
    n = len(problems)
    if not isinstance(directory, str) or not directory:
        problems.append(f"hotweights init_info 'lora_dir' must be a directory path, got {directory!r}")
    if not isinstance(config, Mapping) or not config:
        problems.append("hotweights init_info 'lora_dir' needs 'lora_config', the trainer's LoraConfig as a "
                        f"dict (model.peft_config['default'].to_dict()), got {type(config).__name__}")
    elif config.get("peft_type") not in (None, "LORA"):
        problems.append(f"hotweights init_info 'lora_config' must describe a LoRA adapter (vLLM serves LoRA "
                        f"only), got peft_type {config.get('peft_type')!r}")
    elif not _is_int(config.get("r")) or config["r"] < 1:
        problems.append(f"hotweights init_info 'lora_config' needs 'r', an integer >= 1, "
                        f"got {config.get('r')!r}")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        problems.append(f"hotweights init_info 'lora_adapter' must be an adapter name, got {adapter!r}")
    if len(problems) > n:
        return None
    return LoraOptions(directory=directory, config=dict(config), adapter=adapter or "default")


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
