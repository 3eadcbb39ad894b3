"""Prometheus metrics: one registry per process, measured values only.

Every metric is created once per process, in this module, on a private ``CollectorRegistry`` (never
the global default), so creating a second publisher or receiver never fails with a duplicate
registration, and importing the library never pollutes an application's own registry. Instances tell
themselves apart with an ``endpoint`` label.

``SyncConfig.metrics_port`` (``HOTWEIGHTS_METRICS_PORT``) starts an HTTP exporter on
``metrics_host`` (loopback by default); :func:`snapshot` returns the current values as a dict.
``hotweights metrics`` reads an exporter from another process (:mod:`.metrics_client`).

What each ``hotweights_sync_seconds`` phase measures (publisher unless noted):

- ``gather``: producing the tensors from the source (state dict walk, ZeRO-3 gathers);
- ``encode``: getting a bucket buffer from the transport and packing (and casting) tensors into it;
  on ``shm://`` this write into shared memory is the copy that moves the bytes;
- ``transfer``: handing packed buckets to the transport (``post``), including any wait on its
  in-flight window;
- ``commit``: from ``end`` until every receiver verified and staged the version and ``commit`` went out
  (the two-phase commit, including receivers still verifying the last buckets);
- ``apply`` (receiver): the pause while a committed version is copied into the model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .errors import MetricsError

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SYNC_SECONDS = Histogram(
    "hotweights_sync_seconds", "Seconds spent per sync phase (gather, encode, transfer, commit, apply)",
    ["endpoint", "phase"], buckets=PHASE_BUCKETS, registry=REGISTRY)
BYTES = Counter("hotweights_bytes",
                "Bytes of committed versions as packed for the transport (payload plus headers), "
                "once per version", ["endpoint"], registry=REGISTRY)
DENSE_BYTES = Counter("hotweights_dense_bytes",
                      "Bytes a dense (non-delta) send of the same committed versions takes", ["endpoint"],
                      registry=REGISTRY)
PUBLISHER_VERSION = Gauge("hotweights_publisher_version", "Last version committed by the publisher",
                          ["endpoint"], registry=REGISTRY)
RECEIVER_VERSION = Gauge("hotweights_receiver_version", "Version live on this receiver",
                         ["endpoint", "receiver"], registry=REGISTRY)
VERSION_LAG = Gauge("hotweights_version_lag",
                    "Versions this receiver is behind the newest version it has seen announced",
                    ["endpoint", "receiver"], registry=REGISTRY)
ERRORS = Counter("hotweights_errors", "Errors by kind (exception class)", ["endpoint", "kind"],
                 registry=REGISTRY)
RECEIVERS = Gauge("hotweights_receivers", "Receivers connected to this publisher", ["endpoint"],
                  registry=REGISTRY)

# ---------------------------------------------------------------- delta sync and async publishing
DELTA_DENSITY = Gauge("hotweights_delta_density",
                      "Fraction of elements whose bytes changed in the last push (ranges that had a base)",
                      ["endpoint"], registry=REGISTRY)
PUSH_BYTES = Gauge("hotweights_push_bytes", "Bytes sent by the last push (payload plus headers)", ["endpoint"],
                   registry=REGISTRY)
PUSH_DENSE_BYTES = Gauge("hotweights_push_dense_bytes",
                         "Bytes a dense send of the last push would have taken", ["endpoint"], registry=REGISTRY)
DELTA_SECONDS = Histogram("hotweights_delta_seconds",
                          "Seconds per version spent encoding (publisher) or decoding (receiver) deltas",
                          ["endpoint", "op"], buckets=PHASE_BUCKETS, registry=REGISTRY)
RESYNCS = Counter("hotweights_resyncs",
                  "Tensor ranges re-sent dense because a receiver's base did not match "
                  "(role=receiver: requested, role=publisher: served)", ["endpoint", "role"], registry=REGISTRY)
ASYNC_SKIPPED = Counter("hotweights_async_skipped",
                        "Step boundaries whose version was skipped because pushes were still in flight",
                        ["endpoint"], registry=REGISTRY)
ASYNC_WAIT_SECONDS = Histogram("hotweights_async_wait_seconds",
                               "Seconds the training thread spent at a step boundary (waiting for a slot "
                               "plus taking the snapshot)", ["endpoint"], buckets=PHASE_BUCKETS,
                               registry=REGISTRY)
ASYNC_INFLIGHT = Gauge("hotweights_async_inflight", "Asynchronous pushes queued or running", ["endpoint"],
                       registry=REGISTRY)

# Control plane (hotweights_trainer.control): recorded where the coordinator runs.
HANDLES_POSTED = Counter("hotweights_handles_posted", "Transport handles posted (per version and holder set)",
                         ["endpoint"], registry=REGISTRY)
HANDLES_FETCHED = Counter("hotweights_handles_fetched",
                          "Transport handles a receiver opened to stage a bucket", ["endpoint"],
                          registry=REGISTRY)
HANDLES_ACKED = Counter("hotweights_handles_acked", "Receiver acks of posted handles", ["endpoint"],
                        registry=REGISTRY)
HANDLES_EXPIRED = Counter("hotweights_handles_expired", "Handles whose TTL passed before every holder acked",
                          ["endpoint"], registry=REGISTRY)
HANDLES_ACTIVE = Gauge("hotweights_handles_active", "Posted handles not yet released or expired",
                       ["endpoint"], registry=REGISTRY)
FLEET_RECEIVER_VERSION = Gauge("hotweights_fleet_receiver_version",
                               "Live version of each receiver, as its coordinator last heard",
                               ["endpoint", "receiver"], registry=REGISTRY)
FLEET_RECEIVER_LAG = Gauge("hotweights_fleet_receiver_lag",
                           "Committed version minus the receiver's live version", ["endpoint", "receiver"],
                           registry=REGISTRY)
QUORUM_FAILURES = Counter("hotweights_quorum_failures", "Versions aborted without a commit, by reason",
                          ["endpoint", "reason"], registry=REGISTRY)
EVICTIONS = Counter("hotweights_evictions", "Receivers evicted for missing heartbeats", ["endpoint"],
                    registry=REGISTRY)
REFUSED = Counter("hotweights_refused_requests", "Requests refused (missing or wrong token)",
                  ["endpoint", "reason"], registry=REGISTRY)
COORD_LEADER = Gauge("hotweights_coord_leader",
                     "Fencing token while this process holds the fleet's leader lease, else 0", ["endpoint"],
                     registry=REGISTRY)

_server_lock = threading.Lock()
_servers: dict[tuple[str, int], Any] = {}


def start_exporter(port: int, host: str = "127.0.0.1") -> Optional[int]:
    """Serve this process's registry over HTTP; idempotent per (host, port). 0 means off."""
    if not port:
        return None
    from prometheus_client import start_http_server

    with _server_lock:
        if (host, port) not in _servers:
            try:
                _servers[(host, port)] = start_http_server(port, addr=host, registry=REGISTRY)
            except OSError as exc:  # port taken, address not local, no permission
                raise MetricsError(
                    f"cannot serve metrics on {host}:{port} (metrics_port / HOTWEIGHTS_METRICS_PORT): "
                    f"{exc}; pick another port, or 0 to turn the exporter off") from exc
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return port


def exposition() -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(REGISTRY)


def snapshot() -> dict[str, float]:
    """Every sample as ``{'name{label="v",...}': value}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition().decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out

# ---------------------------------------------------------------- per transport (updated by transports/meter.py)
TRANSPORT_BYTES = Counter("hotweights_transport_bytes", "Bucket bytes a transport moved (per destination group)",
                          ["endpoint", "transport"], registry=REGISTRY)
TRANSPORT_BUCKETS = Counter("hotweights_transport_buckets", "Buckets a transport moved",
                            ["endpoint", "transport"], registry=REGISTRY)
TRANSPORT_SECONDS = Counter("hotweights_transport_seconds", "Seconds buckets spent in flight, summed",
                            ["endpoint", "transport"], registry=REGISTRY)
TRANSPORT_RETRIES = Counter("hotweights_transport_retries", "Connects or sends a transport retried",
                            ["endpoint", "transport"], registry=REGISTRY)
IPC_WINDOW = Gauge("hotweights_ipc_window", "Current in-flight window (buckets)", ["endpoint", "transport"],
                   registry=REGISTRY)
IPC_RECOMMENDED_WINDOW = Gauge("hotweights_ipc_recommended_window",
                               "Window the adaptive controller recommends from measured bucket times",
                               ["endpoint", "transport"], registry=REGISTRY)
IPC_INFLIGHT_BUCKETS = Gauge("hotweights_ipc_inflight_buckets", "Buckets in flight now", ["endpoint", "transport"],
                             registry=REGISTRY)
IPC_INFLIGHT_BYTES = Gauge("hotweights_ipc_inflight_bytes", "Bytes in flight now", ["endpoint", "transport"],
                           registry=REGISTRY)

# ---------------------------------------------------------------- GPU data path (hotweights_trainer/gpu, transports/cuda_ipc.py)
IPC_CONGESTION_RISK = Gauge("hotweights_ipc_congestion_risk",
                            "0-1: bucket time over target and in-flight fill (formula in gpu/congestion.py); "
                            "decays when the pressure goes away", ["endpoint", "transport"], registry=REGISTRY)
IPC_PATH_UTILIZATION = Gauge("hotweights_ipc_path_utilization",
                             "Share of this process's copy chunk assignments that went over each device path "
                             "(src->dst)", ["endpoint", "path"], registry=REGISTRY)
