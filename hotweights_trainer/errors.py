"""The one exception tree of hotweights_trainer.

Every error the library raises on purpose derives from :class:`HotweightsError`, so callers can
``except HotweightsError`` around a sync without catching unrelated bugs. Subclasses also derive
from the closest builtin (``ValueError``, ``TimeoutError``, ``ConnectionError``) so generic code
keeps working.
"""

from __future__ import annotations

from typing import Iterable, Sequence


class HotweightsError(Exception):
    """Base class of every error raised by hotweights_trainer."""


class ConfigError(HotweightsError, ValueError):
    """One or more configuration values are invalid.

    ``problems`` lists every problem found, so a user fixes them all in one go.
    """

    def __init__(self, problems: Sequence[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} configuration problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(msg)


class EndpointError(ConfigError):
    """An endpoint string cannot be parsed or does not fit the chosen transport."""


class WireFormatError(HotweightsError, ValueError):
    """Bytes received from a peer do not form a valid header, bucket or message."""


class CorruptBucketError(WireFormatError):
    """A bucket's checksum does not match its bytes."""


class ManifestMismatchError(HotweightsError, ValueError):
    """The tensors announced by a publisher do not fit the receiver's model.

    ``problems`` maps each offending tensor name to what is wrong with it.
    """

    def __init__(self, problems: dict[str, str]):
        self.problems = dict(problems)
        lines = [f"  - {name}: {why}" for name, why in sorted(self.problems.items())]
        super().__init__(
            f"{len(self.problems)} tensor(s) do not match the receiver's model; nothing was applied:\n"
            + "\n".join(lines)
        )


class SyncTimeoutError(HotweightsError, TimeoutError):
    """A blocking wait passed its deadline."""


class PeerLostError(HotweightsError, ConnectionError):
    """The other side of a sync went away (closed its connection or died)."""


class VersionAbortedError(HotweightsError):
    """A version was discarded before commit; receivers stay on the previous version."""

    def __init__(self, version: int, reason: str, causes: Iterable[str] = ()):
        self.version = version
        self.reason = reason
        self.causes = list(causes)
        detail = "".join(f"\n  - {c}" for c in self.causes)
        super().__init__(f"version {version} aborted: {reason}{detail}")


class RelayError(HotweightsError, RuntimeError):
    """A host relay could not pass a version on: what it feeds (its host's receivers or a downstream
    relay) rejected it or missed its deadline. The upstream fleet aborts that version everywhere."""


class InferenceUpdateError(HotweightsError, RuntimeError):
    """An inference engine (vLLM) failed to apply a committed version; it stays on its previous weights.

    ``version`` is the version it was asked to apply; the engine's own error is the ``__cause__``.
    """

    def __init__(self, version: int, message: str):
        self.version = version
        super().__init__(message)


class TransportUnavailableError(HotweightsError, RuntimeError):
    """A transport was requested that cannot run here (missing library, no device, ...)."""


class ClosedError(HotweightsError, RuntimeError):
    """An operation was attempted on a closed publisher or receiver."""


class EngineError(HotweightsError, RuntimeError):
    """Code of the publisher or receiver engine raised an unexpected exception (a bug, not a peer's
    fault); ``__cause__`` is that exception. The version it belonged to failed at once."""


class KVMigrationError(HotweightsError, ValueError):
    """A KV-cache transform cannot be applied; the cache was left untouched."""


class KVCacheError(HotweightsError, TypeError):
    """An object cannot be registered or handled as a KV cache (wrong type, shape or axes)."""


class OptimizerPolicyError(HotweightsError, RuntimeError):
    """An optimizer-state policy could not be applied."""


class SidecarError(HotweightsError, ValueError):
    """A checkpoint's weight-fingerprint sidecar is missing, unreadable or malformed."""


class CoordinatorError(HotweightsError, RuntimeError):
    """The control plane refused a request or is in an inconsistent state."""


class AuthError(CoordinatorError, PermissionError):
    """A request carried no token or a wrong one."""


class FencedError(CoordinatorError):
    """A write carried a stale fencing token or version and was rejected."""


class StaleVersionError(FencedError):
    """A relayed version carries a number this fleet already numbered past (its receivers run that
    version or a newer one), so it cannot be passed on under the number upstream gave it."""


class MetricsError(HotweightsError, RuntimeError):
    """The Prometheus exporter cannot be started, reached, or read (e.g. its port is taken)."""


class NotLeaderError(CoordinatorError):
    """This coordinator does not hold the fleet's leader lease; ``leader`` names the holder if known."""

    def __init__(self, message: str, leader: str | None = None):
        self.leader = leader
        super().__init__(message)


class UnsupportedAdapterError(ConfigError):
    """A PEFT model holds adapters that the configured ``peft_mode`` cannot send (e.g. a LoRA variant
    such as DoRA under merged sync); ``problems`` names each layer and why."""


class PeftModeError(ManifestMismatchError):
    """A version's PEFT form does not fit the receiver's model: adapter tensors for a receiver without a
    PeftModel, or merged base-model weights for a receiver that holds one. Nothing was applied."""

    def __init__(self, message: str):
        self.problems = {"peft_mode": message}
        Exception.__init__(self, message)


class ShardingMismatchError(HotweightsError, RuntimeError):
    """Ranks disagree on how to gather a sharded model (different bucket size or model structure)."""


def missing_dependency(module: str, extra: str, package: str | None = None) -> ImportError:
    """Build the ImportError raised when an optional dependency is absent.

    The message gives the exact install command, because that is what the user needs next.
    """
    pkg = package or module
    return ImportError(
        f"{module!r} is required for this feature but is not installed. "
        f"Install it with: pip install 'hotweights_trainer[{extra}]'  (or: pip install {pkg})"
    )
