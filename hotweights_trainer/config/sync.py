"""``SyncConfig``: the sections together, each setting also under its flat name, read from the environment.

``SyncConfig`` holds one frozen section per part of the library (``cfg.core``, ``cfg.torch``, ...;
see :mod:`.sections`). Every section field also has a flat name, which is an attribute of
``SyncConfig`` (``cfg.timeout_s``, ``cfg.bcast_chunk_mb``), a keyword of its constructor
(``SyncConfig(timeout_s=5, transport="shm")``) and, upper-cased after ``HOTWEIGHTS_``, its environment
variable. Sections may be passed too, as objects or as dicts (``SyncConfig(torch={"chunk_mb": 64})``);
flat keywords win over them. ``cfg.replace(...)`` and ``dataclasses.replace`` take either form.

Every invalid value, from any section or from the environment, is reported in one ``ConfigError``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Mapping, Optional

from ..errors import ConfigError
from .schema import ENV_PREFIX, Section, env_name, flat_name, label, parse, type_hints
from .sections import (SECTIONS, AsyncPushConfig, ControlConfig, CoreConfig, CudaIpcConfig, DeltaSyncConfig,
                       GpuConfig, KVConfig, MetricsConfig, MpiConfig, OptimConfig, PeftSyncConfig,
                       ReceiversConfig, TorchConfig, UcxConfig, WindowConfig)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One setting as the outside sees it: flat name, variable, section field, documentation facts."""

    flat: str
    env: str
    section: type[Section]
    field: dataclasses.Field

    @property
    def name(self) -> str:
        """The field's name inside its section."""
        return self.field.name

    @property
    def path(self) -> str:
        """``section.field``, as in ``cfg.torch.chunk_mb``."""
        return f"{self.section.KEY}.{self.field.name}"

    @property
    def type(self) -> Any:
        """The type of the section field."""
        return type_hints(self.section)[self.field.name]

    @property
    def scale(self) -> Optional[float]:
        return self.field.metadata.get("flat_scale")

    @property
    def flat_type(self) -> Any:
        """The type of the flat value and of the variable (``int`` milliseconds for a seconds field)."""
        return self.field.metadata.get("flat_type", self.type) if self.scale is not None else self.type

    @property
    def default(self) -> Any:
        """The default in the flat name's unit (what docs/TUNING.md shows)."""
        return self.to_flat(self.field.default)

    @property
    def unit(self) -> str:
        unit = self.field.metadata.get("unit", "")
        return "ms" if self.scale == 1000 and unit == "s" else unit

    @property
    def used_by(self) -> tuple[str, ...]:
        """The transports or parts that read the setting; empty when every one does."""
        return self.field.metadata.get("used_by", self.section.USED_BY)

    @property
    def doc(self) -> str:
        return section_field_docs(self.section)[self.field.name]

    @property
    def label(self) -> str:
        return label(self.section, self.field)

    def to_flat(self, value: Any) -> Any:
        if self.scale is None or value is None:
            return value
        value = value * self.scale
        return int(round(value)) if self.flat_type is int else round(value, 9)

    def from_flat(self, value: Any) -> Any:
        if self.scale is None or value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        return value / self.scale


def _settings() -> tuple[Setting, ...]:
    out = []
    for cls in SECTIONS:
        for f in fields(cls):
            flat = flat_name(cls, f)
            out.append(Setting(flat=flat, env=env_name(flat), section=cls, field=f))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _settings()
"""Every setting, section by section, in declaration order."""

_BY_FLAT: dict[str, Setting] = {s.flat: s for s in SETTINGS}
_SECTION_BY_KEY: dict[str, type[Section]] = {cls.KEY: cls for cls in SECTIONS}


# Not slots=True: the frozen __setattr__ of a slots dataclass breaks on names that are not fields
# (every flat name), where this one refuses them with FrozenInstanceError like the fields.
@dataclass(frozen=True, init=False)
class SyncConfig:
    """All settings of hotweights_trainer, in sections. Construct directly, or with :meth:`from_env`."""

    core: CoreConfig
    receivers: ReceiversConfig
    delta_sync: DeltaSyncConfig
    async_push: AsyncPushConfig
    peft: PeftSyncConfig
    window: WindowConfig
    cuda_ipc: CudaIpcConfig
    torch: TorchConfig
    gpu: GpuConfig
    mpi: MpiConfig
    ucx: UcxConfig
    control: ControlConfig
    metrics: MetricsConfig
    kv: KVConfig
    optim: OptimConfig

    def __init__(self, **values: Any) -> None:
        """Keywords are section names (a section object or a dict of its fields) or flat names."""
        pending: dict[str, dict[str, Any]] = {key: {} for key in _SECTION_BY_KEY}
        ready: dict[str, Section] = {}  # sections given whole: frozen and validated already
        problems: list[str] = []
        for key, value in values.items():
            if key not in _SECTION_BY_KEY:
                continue
            cls = _SECTION_BY_KEY[key]
            if isinstance(value, cls):
                ready[key] = value
            elif isinstance(value, Mapping):
                pending[key].update(value)
            else:
                raise TypeError(f"SyncConfig section {key!r} must be a {cls.__name__} or a dict, "
                                f"got {type(value).__name__}")
        for key, value in values.items():  # flat names after sections: the more specific one wins
            if key in _SECTION_BY_KEY:
                continue
            s = _BY_FLAT.get(key)
            if s is None:
                raise TypeError(f"SyncConfig() got an unexpected keyword argument {key!r}")
            try:
                pending[s.section.KEY][s.name] = s.from_flat(value)
            except ValueError as exc:
                problems.append(f"{s.label} {exc}")
                pending[s.section.KEY].pop(s.name, None)
        for key, cls in _SECTION_BY_KEY.items():
            if not pending[key]:
                object.__setattr__(self, key, ready.get(key) or _default_section(cls))
                continue
            base = ready.get(key)
            if base is not None:  # a whole section plus some flat names: those change a copy of it
                pending[key] = {**{f.name: getattr(base, f.name) for f in fields(cls)}, **pending[key]}
            try:
                object.__setattr__(self, key, cls(**pending[key]))
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        # Flat names are plain instance attributes, copied from the frozen sections once: they are
        # read on hot paths (timeout_s at every wait), where a property costs ~15x a dict lookup.
        for s in SETTINGS:
            object.__setattr__(self, s.flat, s.to_flat(getattr(getattr(self, s.section.KEY), s.name)))

    # ------------------------------------------------------------------------------------------------
    @property
    def bucket_bytes(self) -> int:
        return self.core.bucket_mb << 20

    @property
    def max_message_bytes(self) -> int:
        return self.core.max_message_mb << 20

    @property
    def torch_send_dtype(self):
        """``send_dtype`` as a ``torch.dtype`` (or None)."""
        if self.core.send_dtype is None:
            return None
        import torch

        return getattr(torch, self.core.send_dtype)

    def replace(self, **changes: Any) -> "SyncConfig":
        """A copy with some settings changed, by flat name or by section (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by flat name, in the flat name's unit."""
        return {s.flat: getattr(self, s.flat) for s in SETTINGS}

    @classmethod
    def field_names(cls) -> list[str]:
        """Every keyword the constructor takes: the flat names, then the section names."""
        return [s.flat for s in SETTINGS] + list(_SECTION_BY_KEY)

    @classmethod
    def env_name(cls, field_name: str) -> str:
        return env_name(field_name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "SyncConfig":
        """Read every ``HOTWEIGHTS_*`` variable once and build a validated config.

        ``overrides`` (flat names or sections) win over the environment. All problems, parse errors
        and range errors alike, are raised together in one :class:`ConfigError`. Unknown
        ``HOTWEIGHTS_*`` names are logged as a warning, because they are usually typos.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        problems: list[str] = []
        for s in SETTINGS:
            fallbacks = s.field.metadata.get("env_fallback", ())
            var = s.env if s.env in env else next((v for v in fallbacks if env.get(v)), None)
            if var is None:
                continue
            try:
                kwargs[s.flat] = parse(s.flat_type, env[var])
            except ValueError as exc:
                problems.append(f"{var}={env[var]!r} ({s.path}): {exc}")
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in NON_CONFIG_VARIABLES
                         and k[len(ENV_PREFIX):].lower() not in _BY_FLAT)
        if unknown:
            log.warning("ignoring unknown environment variables (typo?): %s", ", ".join(unknown))
        for key, value in overrides.items():
            if key in _SECTION_BY_KEY:  # a section override replaces what the environment said of it
                given = value if isinstance(value, Mapping) else (
                    {f.name for f in fields(value)} if isinstance(value, Section) else ())
                for s in SETTINGS:
                    if s.section.KEY == key and s.name in given:
                        kwargs.pop(s.flat, None)
        kwargs.update(overrides)
        try:
            cfg = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(problems + exc.problems) from None
        except TypeError as exc:  # an override that is not a setting
            raise ConfigError(problems + [str(exc)]) from None
        if problems:
            raise ConfigError(problems)
        return cfg


@lru_cache(maxsize=None)
def _default_section(cls: type[Section]) -> Section:
    """One shared default instance per section (sections are frozen, so sharing is safe)."""
    return cls()


for _s in SETTINGS:  # a flat name must not hide a section, a property or a method
    if hasattr(SyncConfig, _s.flat) or _s.flat in _SECTION_BY_KEY:
        raise TypeError(f"flat name {_s.flat!r} of {_s.path} collides with a SyncConfig attribute")
del _s


NON_CONFIG_VARIABLES: Mapping[str, str] = {
    "HOTWEIGHTS_REQUIRE": "read by the test suite, not the library: a comma list of optional parts "
                          "(mpi, ucx, redis, deepspeed, hf, vllm, peft, trl) whose tests must fail "
                          "instead of skipping",
}
"""``HOTWEIGHTS_*`` names that are deliberately not settings, each with the reason (docs/TUNING.md
lists them)."""


# ---------------------------------------------------------------- documentation, keyed by flat name
@lru_cache(maxsize=None)
def section_field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of one section, keyed by the section field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            if is_doc and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_docs() -> dict[str, str]:
    """The docstring under each setting's field, keyed by flat name (missing ones are left out)."""
    return {s.flat: section_field_docs(s.section)[s.name] for s in SETTINGS
            if s.name in section_field_docs(s.section)}


def section_title(cls: type) -> str:
    """The first line of a section's docstring."""
    return (cls.__doc__ or cls.KEY).strip().splitlines()[0].rstrip(".")


def field_sections() -> dict[str, str]:
    """The section (``core``, ``torch``, ...) each setting belongs to, keyed by flat name."""
    return {s.flat: s.section.KEY for s in SETTINGS}


def setting(flat: str) -> Setting:
    """The setting with this flat name (KeyError naming it when there is none)."""
    try:
        return _BY_FLAT[flat]
    except KeyError:
        raise KeyError(f"no setting named {flat!r}") from None


def default_of(name: str) -> Any:
    """A setting's default, by flat name, in the flat name's unit."""
    return setting(name).default


__all__ = ["SyncConfig", "Setting", "SETTINGS", "NON_CONFIG_VARIABLES", "field_docs", "field_sections",
           "section_field_docs", "section_title", "setting", "default_of"]
