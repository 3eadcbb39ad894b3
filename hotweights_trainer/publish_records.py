"""What the publisher engine records per version and per receiver, and what a publish returns.

:class:`PublishResult` is public (``hotweights_trainer.PublishResult``); the records and the two
helpers that turn a version's outcome into an error or an abort kind are the engine's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .control.records import Decision, HandleKey
from .delta.encoder import DeltaStats
from .errors import (CorruptBucketError, HotweightsError, ManifestMismatchError, PeftModeError,
                     SyncTimeoutError, VersionAbortedError, WireFormatError)
from .transports.base import BucketBuffer


@dataclass
class PublishResult:
    """What one ``publish`` did. All numbers are measured."""

    version: int
    bytes_sent: int
    tensors_sent: int
    seconds: float
    buckets: int = 0
    receivers: int = 0
    dense_bytes: int = 0
    step: Optional[int] = None
    phases: dict[str, float] = field(default_factory=dict)
    delta: Optional[DeltaStats] = None
    """Delta-sync numbers of this version (changed elements, payload vs dense bytes); None when off."""

    @property
    def gbps(self) -> float:
        return self.bytes_sent / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class VersionRecord:
    """The publisher's record of one version: who it goes to, its buffers, and how it is going."""

    version: int
    step: Optional[int]
    quorum: set[str] = field(default_factory=set)
    buffers: list[BucketBuffer] = field(default_factory=list)
    end: Optional[dict[str, Any]] = None
    handles: set[HandleKey] = field(default_factory=set)  # posted to the coordinator, not yet released
    expired: set[int] = field(default_factory=set)  # bucket indices whose handle expired: free, don't reuse
    staged: set[str] = field(default_factory=set)
    nacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    catchup: dict[str, float] = field(default_factory=dict)  # rid -> deadline
    acked: set[str] = field(default_factory=set)  # receivers holding the commit (pending or live)
    decision: Decision = field(default_factory=Decision.pending)
    error: Optional[HotweightsError] = None  # the engine or the coordinator failed during this version
    state: str = "sending"  # sending -> waiting -> committed | aborted
    peft: Optional[str] = None  # PEFT form of the tensors ("merged"/"adapter"), told to receivers in begin

    def begin_message(self, session: int) -> dict[str, Any]:
        msg = {"op": "begin", "version": self.version, "session": session, "step": self.step}
        if self.peft is not None:
            msg["peft"] = self.peft
        return msg


@dataclass
class ReceiverRecord:
    """A connected receiver as the publisher knows it."""

    rid: str
    pid: int
    live_version: int
    joined: float


# Errors a receiver may report in a nack, re-raised on the trainer with their own type.
_NACK_TYPES: dict[str, type[HotweightsError]] = {
    "ManifestMismatchError": ManifestMismatchError,
    "PeftModeError": PeftModeError,
    "CorruptBucketError": CorruptBucketError,
    "WireFormatError": WireFormatError,
}


def nack_error(version: int, nacks: dict[str, dict[str, Any]]) -> HotweightsError:
    """The error a rejected version raises on the trainer: the first receiver's, with its own type."""
    rid, nack = sorted(nacks.items())[0]
    etype = _NACK_TYPES.get(nack.get("error", ""))
    problems = nack.get("problems")
    if etype is ManifestMismatchError and isinstance(problems, dict):
        return ManifestMismatchError({str(k): str(v) for k, v in problems.items()})
    if etype is not None and etype is not ManifestMismatchError:
        return etype(f"receiver {rid} rejected version {version}: {nack['message']}")
    return VersionAbortedError(version, "rejected by receivers",
                               [f"{r}: {n.get('error')}: {n['message']}" for r, n in nacks.items()])


def abort_kind(exc: BaseException) -> str:
    """How an exception that ended a publish is reported to receivers and metrics."""
    if isinstance(exc, SyncTimeoutError):
        return "timeout"
    if isinstance(exc, (ManifestMismatchError, WireFormatError, VersionAbortedError)):
        return "rejected"
    return "error"


__all__ = ["PublishResult", "ReceiverRecord", "VersionRecord", "abort_kind", "nack_error"]
