"""Typed answers of the coordinator, as the publisher's engine reads them.

The coordinator speaks plain JSON values (the same object serves an in-process publisher and, through
``hotweights coord serve``, remote ones). :class:`~.session.FleetSession` turns each answer into one
of these records, checking every field it reads, so a malformed answer from a remote coordinator is a
:class:`~hotweights_trainer.errors.CoordinatorError` naming the field rather than a ``KeyError`` deep
in the engine. Handle keys travel as ``"VERSION.INDEX"`` strings and are parsed here once into
``(version, index)`` pairs (:data:`HandleKey`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CoordinatorError
from .handles import Handle

HandleKey = tuple[int, int]
"""(version, bucket index) of a posted handle."""


def handle_key(key: Any) -> HandleKey:
    """Parse ``"VERSION.INDEX"``."""
    try:
        version, index = str(key).split(".", 1)
        return int(version), int(index)
    except ValueError:
        raise CoordinatorError(f"coordinator answered a malformed handle key {key!r} "
                               "(expected 'VERSION.INDEX')") from None


def format_key(key: HandleKey) -> str:
    return f"{key[0]}.{key[1]}"


def _field(d: Any, name: str, tp: Any, what: str) -> Any:
    if not isinstance(d, dict):
        raise CoordinatorError(f"coordinator answered {what} with {type(d).__name__}, expected an object")
    value = d.get(name)
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise CoordinatorError(f"coordinator answer to {what}: field {name!r} is {value!r:.80}, expected "
                               f"{getattr(tp, '__name__', tp)}")
    return value


def _strings(d: Any, name: str, what: str) -> list[str]:
    items = _field(d, name, list, what)
    if not all(isinstance(x, str) for x in items):
        raise CoordinatorError(f"coordinator answer to {what}: {name!r} must list strings")
    return items


@dataclass(frozen=True)
class Decision:
    """What should happen to the open version now."""

    version: Optional[int]
    """The open version it is about; None when no version is open."""
    decision: str
    """``pending``, ``commit``, ``abort`` or ``none`` (no version open)."""
    kind: str = ""
    """Why an abort: ``nack``, ``majority``, ``deadline``."""
    reason: str = ""

    @classmethod
    def pending(cls, version: Optional[int] = None) -> "Decision":
        return cls(version, "pending")

    @classmethod
    def parse(cls, d: Any, what: str = "a decision") -> "Decision":
        decision = _field(d, "decision", str, what)
        if decision not in ("pending", "commit", "abort", "none"):
            raise CoordinatorError(f"coordinator answer to {what}: unknown decision {decision!r}")
        version = d.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise CoordinatorError(f"coordinator answer to {what}: version {version!r} is not an integer")
        kind, reason = d.get("kind", ""), d.get("reason", "")
        return cls(version, decision, kind if isinstance(kind, str) else "",
                   reason if isinstance(reason, str) else "")


@dataclass(frozen=True)
class Claimed:
    epoch: int
    committed: int
    expired: list[Handle] = field(default_factory=list)
    """A dead predecessor's handles, to free."""

    @classmethod
    def parse(cls, d: Any) -> "Claimed":
        return cls(_field(d, "epoch", int, "claim"), _field(d, "committed", int, "claim"),
                   [Handle.from_dict(h) for h in d.get("expired", [])])


@dataclass(frozen=True)
class Registered:
    committed: int

    @classmethod
    def parse(cls, d: Any) -> "Registered":
        return cls(_field(d, "committed", int, "register"))


@dataclass(frozen=True)
class Begun:
    version: int
    quorum: list[str]

    @classmethod
    def parse(cls, d: Any) -> "Begun":
        return cls(_field(d, "version", int, "begin"), _strings(d, "quorum", "begin"))


@dataclass(frozen=True)
class Left:
    decision: Decision
    released: list[HandleKey]

    @classmethod
    def parse(cls, d: Any) -> "Left":
        return cls(Decision.parse(_field(d, "decision", dict, "leave"), "leave"),
                   [handle_key(k) for k in _strings(d, "released", "leave")])


@dataclass(frozen=True)
class Committed:
    version: int
    ready: list[str]
    """Staged it: they are told to commit now."""
    stragglers: list[str]
    """Majority quorum: had not staged yet; they get the commit once they do."""
    failed: list[str]
    """Majority quorum: rejected it."""
    released: list[HandleKey]
    """The previous version's handles, unpinned by this commit."""

    @classmethod
    def parse(cls, d: Any) -> "Committed":
        return cls(_field(d, "version", int, "commit"), _strings(d, "ready", "commit"),
                   _strings(d, "stragglers", "commit"), _strings(d, "failed", "commit"),
                   [handle_key(k) for k in _strings(d, "released", "commit")])


@dataclass(frozen=True)
class Swept:
    evicted: list[str]
    released: list[HandleKey]
    expired: list[Handle]
    decision: Decision

    @classmethod
    def parse(cls, d: Any) -> "Swept":
        return cls(_strings(d, "evicted", "sweep"), [handle_key(k) for k in _strings(d, "released", "sweep")],
                   [Handle.from_dict(h) for h in _field(d, "expired", list, "sweep")],
                   Decision.parse(_field(d, "decision", dict, "sweep"), "sweep"))


__all__ = ["Begun", "Claimed", "Committed", "Decision", "HandleKey", "Left", "Registered", "Swept",
           "format_key", "handle_key"]
