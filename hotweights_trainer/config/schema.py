"""How a setting is declared and checked: field metadata, one generic validator, environment parsing.

A section is a ``@dataclass(kw_only=True, slots=True, frozen=True)`` whose fields are declared with
:func:`setting`. Everything a check needs is on the field, so no list of names is kept by hand:

=================  ==============================================================================
metadata key       meaning
=================  ==============================================================================
``flat``           the field's flat name on ``SyncConfig`` (``cfg.bcast_chunk_mb``); the
                   environment variable is ``HOTWEIGHTS_`` + the flat name in upper case
``min`` / ``max``  inclusive bounds, in the section field's unit
``gt``             exclusive lower bound (``gt=0`` for durations that must be positive)
``choices``        allowed values for a plain ``str`` field (``Literal`` types carry their own)
``check``          a function that raises ``ValueError`` for a bad value (comma lists)
``unit``           ``s``, ``MiB``, ``bytes``, ``count``, ... (shown in docs/TUNING.md)
``flat_scale``     flat value = section value x ``flat_scale``: the flat name and its variable keep
                   an older unit (``coord_lease_ms`` reads milliseconds, ``control.lease_s`` holds
                   seconds); ``flat_type`` is the flat value's type (``int`` milliseconds)
``used_by``        the transports or parts that read the setting; empty means every one
``env_fallback``   variables read when the setting's own variable is absent (``NCCL_IB_HCA``)
=================  ==============================================================================

:func:`section_problems` is the one place where types, bounds and choices are enforced; a section's
``_relations()`` adds the checks that involve two of its fields. Every message names the section
field, its flat name and its variable, so a user can find it from either side.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field, fields
from functools import lru_cache
from typing import Any, Callable, ClassVar, Literal, Optional, get_args, get_origin

from ..errors import ConfigError

ENV_PREFIX = "HOTWEIGHTS_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def setting(default: Any, *, flat: Optional[str] = None, min: Optional[float] = None,  # noqa: A002
            max: Optional[float] = None, gt: Optional[float] = None,  # noqa: A002
            choices: Optional[tuple[Any, ...]] = None, check: Optional[Callable[[Any], Any]] = None,
            unit: str = "", flat_scale: Optional[float] = None, flat_type: Optional[type] = None,
            used_by: Optional[tuple[str, ...]] = None, env_fallback: tuple[str, ...] = ()) -> Any:
    """A section field with its checks and documentation facts in the field metadata."""
    meta = {"flat": flat, "min": min, "max": max, "gt": gt, "choices": choices, "check": check,
            "unit": unit, "flat_scale": flat_scale, "flat_type": flat_type, "used_by": used_by,
            "env_fallback": env_fallback}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


class Section:
    """Mixin of every section: validation on construction and the class facts a label needs.

    ``KEY`` is the section's attribute on ``SyncConfig`` (``cfg.torch``); ``FLAT_PREFIX`` turns a
    section field name into its flat name unless the field says otherwise (``chunk_mb`` of the torch
    section is ``bcast_chunk_mb``); ``USED_BY`` is what the fields default to in ``used_by``.
    """

    __slots__ = ()
    KEY: ClassVar[str] = ""
    FLAT_PREFIX: ClassVar[str] = ""
    USED_BY: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        problems = section_problems(self)
        if problems:
            raise ConfigError(problems)

    def _relations(self) -> list[str]:
        """Checks between fields of this section; run only once every field has a valid value."""
        return []

    def _label(self, name: str) -> str:
        return label(type(self), next(f for f in fields(self) if f.name == name))

    # Pickling of frozen slots dataclasses: Python 3.11 generates these, 3.10 may not.
    def __getstate__(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    def __setstate__(self, state: list[Any]) -> None:
        for f, value in zip(fields(self), state):
            object.__setattr__(self, f.name, value)


# ---------------------------------------------------------------- facts about one field
def flat_name(cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("flat") or cls.FLAT_PREFIX + f.name


def env_name(flat: str) -> str:
    return ENV_PREFIX + flat.upper()


def label(cls: type, f: dataclasses.Field) -> str:
    """``torch.chunk_mb (bcast_chunk_mb, HOTWEIGHTS_BCAST_CHUNK_MB)``: every name a user may know it by."""
    flat = flat_name(cls, f)
    names = [flat] if flat != f.name else []
    names.append(env_name(flat))
    scale = f.metadata.get("flat_scale")
    if scale is not None:
        names[-1] += f" in {_scaled_unit(f.metadata.get('unit', ''), scale)}"
    return f"{cls.KEY}.{f.name} ({', '.join(names)})"


def _scaled_unit(unit: str, scale: float) -> str:
    return {("s", 1000): "ms"}.get((unit, int(scale)), f"{unit} x {scale:g}")


@lru_cache(maxsize=None)
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) is typing.Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


# ---------------------------------------------------------------- the one validator
def section_problems(obj: Any) -> list[str]:
    """Every invalid value of one section, as sentences naming the field and its variable."""
    cls = type(obj)
    hints = type_hints(cls)
    out: list[str] = []
    for f in fields(obj):
        out.extend(_field_problems(cls, f, hints[f.name], getattr(obj, f.name)))
    if not out:
        out.extend(obj._relations())
    return out


def _field_problems(cls: type, f: dataclasses.Field, tp: Any, value: Any) -> list[str]:
    type_problem = _type_problem(tp, value)
    if type_problem:
        return [f"{label(cls, f)} {type_problem}, got {value!r}"]
    if value is None:
        return []
    m = f.metadata
    where = label(cls, f)
    if "choices" in m and value not in m["choices"]:
        return [f"{where} must be one of {', '.join(map(str, m['choices']))} or empty, got {value!r}"]
    if "gt" in m and not value > m["gt"]:
        return [f"{where} must be > {m['gt']:g}, got {value!r}"]
    low, high = m.get("min"), m.get("max")
    if low is not None and high is not None and not low <= value <= high:
        return [f"{where} must be within [{low:g}, {high:g}], got {value!r}"]
    if low is not None and not value >= low:
        return [f"{where} must be >= {low:g}, got {value!r}"]
    if high is not None and not value <= high:
        return [f"{where} must be <= {high:g}, got {value!r}"]
    if "check" in m:
        try:
            m["check"](value)
        except ValueError as exc:
            return [f"{where}: {exc}"]
    return []


def _type_problem(tp: Any, value: Any) -> str:
    inner, optional = unwrap_optional(tp)
    if value is None:
        return "" if optional else "must not be None"
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        return "" if value in choices else f"must be one of {', '.join(map(str, choices))}"
    if inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, inner)
    return "" if ok else f"must be {inner.__name__}"


# ---------------------------------------------------------------- environment strings
def parse(tp: Any, raw: str) -> Any:
    """Turn an environment string into a value of type ``tp`` (raises ValueError with a reason)."""
    inner, optional = unwrap_optional(tp)
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        return text
    if inner is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("must be a boolean (1/0, true/false, yes/no, on/off)")
    if inner is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be an integer") from None
    if inner is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("must be a number") from None
    return raw


def parse_int_list(text: str) -> list[int]:
    """Parse "8,16,32" into [8, 16, 32] (each > 0)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


__all__ = ["ENV_PREFIX", "Section", "setting", "section_problems", "parse", "parse_int_list", "label",
           "flat_name", "env_name", "type_hints", "unwrap_optional"]
