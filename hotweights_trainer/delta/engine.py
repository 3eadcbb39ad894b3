"""The hooks through which the publisher and receiver engines use delta sync.

Both engines stay unaware of snapshots, shadows and resyncs: they call these few methods at the
points of the protocol where delta sync needs to act, and skip them when delta sync is off.

Capabilities travel in the existing handshake: a receiver's ``hello`` says ``"delta": false`` when
its config turns delta off (the publisher then sends dense versions while it is in the quorum), and
the publisher's ``welcome`` says whether it sends deltas at all (receivers keep no shadow otherwise).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional

import torch

from .. import metrics
from ..config import SyncConfig
from ..errors import ConfigError, HotweightsError, WireFormatError
from ..receive.shadow import ShadowStore
from ..receive.staging import StagedVersion
from ..transports.base import PublisherTransport
from ..wire.bucket import FLAG_RESYNC, BucketHeader
from ..wire.packer import PlannedBucket
from .encoder import DeltaEncoder, DeltaStats
from .resync import ResyncServer

log = logging.getLogger(__name__)


class PublisherDelta:
    def __init__(self, config: SyncConfig, transport: PublisherTransport, *, session: int, endpoint_label: str):
        self.encoder = DeltaEncoder(config)
        self._timeout = config.timeout_s
        self._incapable: set[str] = set()
        self.resync = ResyncServer(self.encoder, transport, session=session, bucket_bytes=config.bucket_bytes,
                                   endpoint_label=endpoint_label,
                                   max_ranges=lambda: self.encoder.range_count)

    def on_join(self, rid: str, hello: dict[str, Any]) -> None:
        if hello.get("delta") is False:
            self._incapable.add(rid)
            log.info("receiver %s does not take deltas; versions go dense while it is connected", rid)

    def on_lost(self, rid: str) -> None:
        self._incapable.discard(rid)
        self.resync.forget(rid)

    def on_message(self, rid: str, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "resync":
            self.resync.request(rid, msg["version"], msg["ranges"])
        elif op in ("staged", "nack", "release"):
            self.resync.release(rid, msg["version"])

    def plan(self, items: Iterable[tuple[str, torch.Tensor]], version: int, quorum: Iterable[str],
             stats: DeltaStats) -> Iterator[PlannedBucket]:
        allow = not (set(quorum) & self._incapable)
        return self.encoder.plan(items, version, allow_delta=allow, stats=stats)

    def commit(self, version: int) -> None:
        self.encoder.commit(version)

    def close(self) -> None:
        self.resync.close(self._timeout)


def delta_unavailable(transport: Any) -> Optional[str]:
    """Why ``transport`` (a publisher transport or its class) cannot carry delta sync; None if it can."""
    if not getattr(transport, "supports_delta", True):
        return (f"the {transport.name} transport keeps buckets in device memory and delta sync encodes on "
                "the host")
    if not transport.addressable:
        return (f"delta sync needs a transport that can address one receiver (for resyncs) and "
                f"{transport.name} cannot")
    return None


_warned_dense: set[str] = set()  # one warning per transport and process, not one per publisher


def make_publisher_delta(config: SyncConfig, transport: PublisherTransport, *, session: int,
                         endpoint_label: str) -> Optional[PublisherDelta]:
    """The publisher's delta hooks, or None when versions go dense.

    Delta sync that cannot run on the chosen transport is never dropped in silence: ``delta="always"``
    is refused with a ``ConfigError``; under the default ``auto`` a warning says so once per process,
    naming the transport and whether auto-selection chose it (the usual way to land on ``cuda_ipc``).
    """
    if config.delta == "off":
        return None
    why = delta_unavailable(transport)
    if why is None:
        return PublisherDelta(config, transport, session=session, endpoint_label=endpoint_label)
    chosen = " (chosen by transport auto-selection)" if config.transport == "auto" else ""
    if config.delta == "always":
        transport.close()  # not started yet, and the publisher that would own it is never built
        raise ConfigError(f"delta='always' cannot take effect on {transport.name}{chosen}: {why}; set "
                          "delta='auto' or 'off', or a transport that takes deltas (transport='shm')")
    if transport.name not in _warned_dense:
        _warned_dense.add(transport.name)
        log.warning("delta sync is off on %s%s, every version is sent dense: %s. Set transport='shm' to keep "
                    "delta sync, or delta='off' to choose dense explicitly", transport.name, chosen, why)
    return None


class ReceiverDelta:
    def __init__(self, config: SyncConfig, endpoint_label: str):
        self.wanted = config.delta != "off"
        self.shadow = ShadowStore()
        self._ep = endpoint_label

    def hello_fields(self) -> dict[str, Any]:
        return {"delta": self.wanted}

    def on_welcome(self, msg: dict[str, Any]) -> None:
        self.shadow.enabled = self.wanted and msg.get("delta") is True

    def on_bucket(self, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
        """Private tensors for the entries of a verified bucket (after ``st.add_bucket``)."""
        _typed(self.shadow.stage_bucket, st, header, data)

    @staticmethod
    def is_resync(header: BucketHeader) -> bool:
        return bool(header.flags & FLAG_RESYNC)

    def on_resync_bucket(self, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
        _typed(self.shadow.fill_resync, st, header, data)

    def resync_request(self, st: StagedVersion) -> Optional[dict[str, Any]]:
        """The request for every range ``st`` still needs, or None when nothing is missing."""
        if not st.needs:
            return None
        metrics.RESYNCS.labels(self._ep, "receiver").inc(len(st.needs))
        log.info("version %d: asking for dense copies of %d range(s) whose base this receiver lacks",
                 st.version, len(st.needs))
        return {"op": "resync", "version": st.version, "ranges": [list(k) for k in st.needs]}

    def on_staged(self, st: StagedVersion) -> None:
        if st.decode_seconds:
            metrics.DELTA_SECONDS.labels(self._ep, "decode").observe(st.decode_seconds)

    def on_commit(self, st: StagedVersion) -> None:
        if self.shadow.enabled:
            self.shadow.commit(st)

    def on_release(self, st: StagedVersion) -> None:
        self.shadow.release(st)


def _typed(fn: Any, st: StagedVersion, header: BucketHeader, data: memoryview) -> None:
    """Run a staging step; any failure becomes a WireFormatError that rejects the whole version."""
    try:
        fn(st, header, data)
    except HotweightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a version that cannot be decoded must be rejected, not half-staged
        log.exception("decoding bucket %d of version %d failed", header.index, st.version)
        raise WireFormatError(f"bucket {header.index} of version {st.version} could not be decoded: "
                              f"{type(exc).__name__}: {exc}") from exc
