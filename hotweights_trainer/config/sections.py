"""The sections of ``SyncConfig``: one typed dataclass per part of the library.

Each section is reached as an attribute of ``SyncConfig`` (``cfg.core``, ``cfg.torch``, ``cfg.window``)
and each of its fields also under its flat name (``cfg.timeout_s``, ``cfg.bcast_chunk_mb``), which
names its environment variable (``HOTWEIGHTS_BCAST_CHUNK_MB``). The docstring under a field is its
documentation; ``docs/TUNING.md`` is generated from it. The class docstring's first line is the
section's title there.

Units: durations in seconds (``_s``), sizes in MiB (``_mb``). Three flat names keep milliseconds
because their variables were published that way (``ipc_target_bucket_ms``, ``ucx_retry_delay_ms``,
``coord_lease_ms``): the section field holds seconds and the flat name converts. One size stays in
bytes, ``ipc_inflight_bytes``, because the cap is compared with exact bucket sizes and its variable
says bytes. ``handle_ttl`` has always been seconds; its section field is ``control.handle_ttl_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from .schema import Section, parse_int_list, setting

TransportName = Literal["auto", "shm", "torch", "mpi", "ucx", "cuda_ipc"]
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")

# The transports whose publishers pipeline buckets through transports/window.py.
WINDOWED = ("cuda_ipc", "torch", "mpi", "ucx")

_section = dataclass(kw_only=True, slots=True, frozen=True)


@_section
class CoreConfig(Section):
    """Core engine: transport, buckets, deadlines. Applies to publishers and receivers on every transport."""

    KEY: ClassVar[str] = "core"

    transport: TransportName = setting("auto")
    """Transport that moves buckets: auto, shm, torch, mpi, ucx or cuda_ipc. ``auto`` chooses from the
    endpoint and the environment and logs why. Applies to publishers and receivers."""

    bucket_mb: int = setting(32, min=1, unit="MiB")
    """Size of one bucket in MiB. Tensors are packed into flat buckets of this size (large tensors are
    split across buckets), so a sync costs one round trip per bucket, never per tensor."""

    timeout_s: float = setting(60.0, gt=0, unit="s")
    """Deadline in seconds for every blocking wait: waiting for receivers to stage a version, for a
    version to arrive, for a free buffer, for a peer to answer. A dead peer surfaces as
    SyncTimeoutError or PeerLostError within this time."""

    send_dtype: Optional[str] = setting(None, choices=DTYPE_NAMES)
    """Cast floating-point tensors to this dtype on the trainer before sending (float32, float16,
    bfloat16). Empty keeps each tensor's own dtype. bfloat16 halves the bytes of fp32 weights when
    inference runs in bf16."""

    on_error: Literal["raise", "warn"] = setting("raise")
    """What a failed push does on the trainer side: ``raise`` stops training with the error, ``warn``
    logs it, counts it in hotweights_errors_total and lets training go on."""

    max_message_mb: int = setting(64, min=1, unit="MiB")
    """Upper bound in MiB for one control message or bucket header decoded from a peer. Anything larger
    is rejected before it is read."""


@_section
class ReceiversConfig(Section):
    """Receivers at the start and end of a run: how long a publisher waits for them and serves them."""

    KEY: ClassVar[str] = "receivers"
    USED_BY: ClassVar[tuple[str, ...]] = ("publisher",)

    min_receivers: int = setting(0, min=0, unit="count")
    """Receivers a publisher waits for before it sends its first version; 0 sends at once, to whoever
    is connected. Every callback (HF Trainer, Accelerate, DeepSpeed) publishes through a publisher,
    so it waits too. The wait happens at the first push, not at start-up, so training overlaps the
    inference side's start. It logs progress while it waits."""

    receiver_wait_s: float = setting(300.0, gt=0, unit="s")
    """Deadline in seconds of the wait for min_receivers; past it the first publish raises
    SyncTimeoutError naming the endpoint. Separate from timeout_s because an inference process may
    take minutes to start (import torch, load the model, start an engine), which says nothing about
    a dead peer."""

    linger_s: float = setting(30.0, min=0, unit="s")
    """Seconds a closing publisher (including the callbacks at the end of training) keeps serving its
    last version while a connected receiver has not committed it yet, or while no receiver has (one
    that is still starting gets it when it connects). It returns as soon as they all have; 0 closes
    at once. 30 s covers a receiver still importing torch and loading a small model, and a vLLM
    engine start (17-28 s measured for a tiny model on a 2-core CPU); raise it for slower starts."""

    exit_linger_s: float = setting(0.0, min=0, unit="s")
    """Seconds a publisher that was never closed lingers (as for linger_s) when the interpreter exits,
    where it is closed for you so its shared memory is freed. 0 (default): close at once, so a script
    that ends without ``close()`` exits promptly; raise it to let receivers still starting get the
    last version."""


@_section
class DeltaSyncConfig(Section):
    """Delta sync: send only the elements that changed since the last committed version."""

    KEY: ClassVar[str] = "delta_sync"
    FLAT_PREFIX: ClassVar[str] = "delta_"
    USED_BY: ClassVar[tuple[str, ...]] = ("shm", "torch", "mpi", "ucx")

    mode: Literal["auto", "off", "always"] = setting("auto", flat="delta")
    """Sparse delta sync. ``auto`` sends a full snapshot first and then only changed elements when that
    is smaller; ``off`` always sends dense tensors; ``always`` forces the delta encoding after the
    first full sync even where dense would be smaller. The cuda_ipc transport always sends dense
    buckets (receivers map the trainer's device memory directly)."""

    zstd: bool = setting(False)
    """Run delta payloads through zstandard (needs the ``zstandard`` package). The delta format is
    already near the entropy of small updates, so this saves only a few percent (about 1-3% on
    bf16 fine-tuning updates); it may help on very slow links."""


@_section
class AsyncPushConfig(Section):
    """Asynchronous publishing: push a step's weights while the next step trains."""

    KEY: ClassVar[str] = "async_push"
    USED_BY: ClassVar[tuple[str, ...]] = ("trainer callbacks",)

    enabled: bool = setting(False, flat="async_publish")
    """Publish from a background thread while the next training step runs. The snapshot is taken at
    the step boundary, so a version always equals the weights of one step."""

    max_staleness: int = setting(1, min=1, unit="versions")
    """With async_publish: how many versions a push may still be in flight when the next step boundary
    is reached before ``staleness_policy`` applies."""

    staleness_policy: Literal["wait", "skip"] = setting("wait")
    """With async_publish, when the previous push is still running at a step boundary: ``wait`` blocks
    until it finishes, ``skip`` drops this step's version (never a half-sent one)."""


@_section
class PeftSyncConfig(Section):
    """PEFT / LoRA models: what a model holding adapters sends."""

    KEY: ClassVar[str] = "peft"
    FLAT_PREFIX: ClassVar[str] = "peft_"
    USED_BY: ClassVar[tuple[str, ...]] = ("publisher",)

    mode: Literal["merged", "adapter"] = setting("merged")
    """How a model holding PEFT adapters (peft's get_peft_model) is sent. ``merged``: every tensor under
    the base model's name with each LoRA layer's weight sent as W + scaling * (B @ A), exactly what
    merge_and_unload() gives, computed into the outgoing data (the trainer's weights are never
    written); for receivers holding the plain base model. ``adapter``: only the adapter tensors,
    modules_to_save copies and other trainable tensors, under the PeftModel's names; for receivers
    holding the same PeftModel. Models without PEFT layers are unaffected."""


@_section
class WindowConfig(Section):
    """In-flight window: buckets moving at once on the pipelining transports (cuda_ipc, torch, mpi, ucx).

    The ``ipc_`` prefix of the flat names is historical: the window was first written for CUDA-IPC,
    and the same knobs now drive the cuda_ipc, torch, mpi and ucx publishers alike (mpi starts from
    ``mpi_window`` instead of ``ipc_inflight_buckets``). The shm transport has no window: each
    bucket is packed straight into a shared-memory block that receivers map.
    """

    KEY: ClassVar[str] = "window"
    FLAT_PREFIX: ClassVar[str] = "ipc_"
    USED_BY: ClassVar[tuple[str, ...]] = WINDOWED

    inflight_buckets: int = setting(4, min=1, unit="count")
    """Base window: how many buckets may be in flight at once on cuda_ipc, torch and ucx (mpi starts
    from mpi_window instead)."""

    inflight_bytes: int = setting(0, min=0, unit="bytes")
    """Cap on the bytes in flight at once, in bytes (compared with exact bucket sizes); 0 turns the
    cap off. A bucket larger than the cap still goes, alone."""

    adapt: bool = setting(False)
    """Adapt the window so that one bucket takes about ipc_target_bucket_ms, within
    ipc_min_inflight..ipc_max_inflight."""

    target_bucket_s: float = setting(0.25, flat="ipc_target_bucket_ms", flat_scale=1000, flat_type=float,
                                     gt=0, unit="s")
    """Target time per bucket for the adaptive window. The variable is in milliseconds (default 250);
    the section field holds seconds."""

    min_inflight: int = setting(1, min=1, unit="count")
    """Lower bound of the adaptive window."""

    max_inflight: int = setting(16, min=1, unit="count")
    """Upper bound of the adaptive window."""

    def _relations(self) -> list[str]:
        if self.min_inflight > self.max_inflight:
            return [f"{self._label('min_inflight')} ({self.min_inflight}) must not exceed "
                    f"{self._label('max_inflight')} ({self.max_inflight})"]
        return []


@_section
class CudaIpcConfig(Section):
    """CUDA-IPC copy tuning: the device-side scatter of a mapped bucket into parameters (cuda_ipc only)."""

    KEY: ClassVar[str] = "cuda_ipc"
    FLAT_PREFIX: ClassVar[str] = "ipc_copy_"
    USED_BY: ClassVar[tuple[str, ...]] = ("cuda_ipc",)

    autotune: bool = setting(False)
    """Pick larger copy chunks and more CUDA streams when peer access or NVLink is present."""

    chunk_mb: int = setting(16, min=1, unit="MiB")
    """Chunk size in MiB of the device-side scatter from a staged bucket into parameters."""

    streams: int = setting(2, min=1, unit="count")
    """Number of CUDA streams the device-side scatter uses."""


@_section
class TorchConfig(Section):
    """torch.distributed transport: process-group backend and broadcast blocks (torch only)."""

    KEY: ClassVar[str] = "torch"
    FLAT_PREFIX: ClassVar[str] = "bcast_"
    USED_BY: ClassVar[tuple[str, ...]] = ("torch",)

    backend: Literal["auto", "gloo", "nccl", "ccl"] = setting("auto", flat="torch_backend")
    """Backend of the torch transport's process group. ``auto`` takes nccl on CUDA/ROCm, ccl on Intel
    XPU and gloo otherwise, falling back to gloo with a logged reason."""

    chunk_mb: int = setting(32, min=1, unit="MiB")
    """Size in MiB of one broadcast block on the torch transport."""

    prefetch: bool = setting(False)
    """On the root, assemble the next bucket while the current one is being broadcast."""

    autotune: bool = setting(False)
    """Run a short broadcast microbenchmark across the group and set bcast_chunk_mb from it."""

    autotune_mb: int = setting(128, min=1, unit="MiB")
    """Data size in MiB of the broadcast microbenchmark."""

    autotune_chunks_mb: str = setting("8,16,32,64", check=parse_int_list, unit="MiB list")
    """Comma-separated chunk sizes in MiB the broadcast microbenchmark tries."""


@_section
class GpuConfig(Section):
    """Device-side work: the scatter on the torch transport's receivers, and GPUDirect Storage."""

    KEY: ClassVar[str] = "gpu"
    FLAT_PREFIX: ClassVar[str] = "gpu_copy_"
    USED_BY: ClassVar[tuple[str, ...]] = ("torch",)

    autotune: bool = setting(False)
    """Heuristic tuning of device scatter chunks and streams from peer access (CUDA)."""

    chunk_mb: int = setting(16, min=1, unit="MiB")
    """Chunk size in MiB of per-copy device scatter on the broadcast path."""

    streams: int = setting(2, min=1, unit="count")
    """Number of CUDA streams for the device scatter on the broadcast path."""

    micro: bool = setting(False)
    """Run a local device-copy microbenchmark and set gpu_copy_chunk_mb and gpu_copy_streams from it."""

    autotune_mb: int = setting(256, min=1, unit="MiB")
    """Data size in MiB of the device-copy microbenchmark."""

    micro_chunks_mb: str = setting("4,8,16,32,64", check=parse_int_list, unit="MiB list")
    """Comma-separated chunk sizes in MiB the device-copy microbenchmark tries."""

    micro_streams: str = setting("1,2,4", check=parse_int_list, unit="count list")
    """Comma-separated stream counts the device-copy microbenchmark tries."""

    use_gds: bool = setting(False, flat="use_gds", used_by=("checkpoint publishing (CheckpointReader)",))
    """Read checkpoint shards straight into device buckets with GPUDirect Storage (needs CuPy and
    KvikIO); falls back to CPU assembly plus host-to-device copy and logs why."""


@_section
class MpiConfig(Section):
    """MPI transport: non-blocking broadcasts (mpi only)."""

    KEY: ClassVar[str] = "mpi"
    FLAT_PREFIX: ClassVar[str] = "mpi_"
    USED_BY: ClassVar[tuple[str, ...]] = ("mpi",)

    window: int = setting(4, min=1, unit="count")
    """Non-blocking broadcasts kept in flight by the MPI transport (CLI: --window); the starting
    window, which the ipc_* window settings then bound and adapt."""

    chunk_mb: int = setting(16, min=1, unit="MiB")
    """Size in MiB of one MPI broadcast chunk (CLI: --mpi-chunk-mb)."""


@_section
class UcxConfig(Section):
    """UCX transport: sends, retries and UCX's own options (ucx only)."""

    KEY: ClassVar[str] = "ucx"
    FLAT_PREFIX: ClassVar[str] = "ucx_"
    USED_BY: ClassVar[tuple[str, ...]] = ("ucx",)

    chunk_mb: int = setting(16, min=1, unit="MiB")
    """Size in MiB of one UCX send."""

    concurrency: int = setting(0, min=0, unit="count")
    """Concurrent UCX sends per receiver; 0 picks automatically."""

    inflight_limit_mb: int = setting(256, min=1, unit="MiB")
    """Cap in MiB on UCX bytes in flight per receiver."""

    retries: int = setting(3, min=0, unit="count")
    """How often a failed UCX connect or send is retried before the error surfaces."""

    retry_delay_s: float = setting(0.1, flat="ucx_retry_delay_ms", flat_scale=1000, flat_type=int,
                                   min=0, unit="s")
    """Delay between UCX retries. The variable is in milliseconds (default 100); the section field
    holds seconds."""

    net_devices: Optional[str] = setting(None, env_fallback=("NCCL_IB_HCA",))
    """UCX network devices (UCX_NET_DEVICES); empty falls back to NCCL_IB_HCA, then to UCX's choice."""

    options: str = setting("TCP_TX_SEG_SIZE=1m,TCP_RX_SEG_SIZE=1m")
    """Extra UCX options as comma-separated KEY=VALUE (the UCX_ prefix is optional). They override
    UCX's own UCX_* variables. The default 1 MiB TCP segments move large buffers several times faster
    than UCX's 64 KiB default."""

    backend: Literal["auto", "ucp", "ucxx", "ucxx-async"] = setting("auto")
    """Python binding of the ucx transport: ``auto`` takes ucx-py (ucp) when importable, else ucxx's
    core API; ``ucxx-async`` drives ucxx through the asyncio API ucx-py shares."""


@_section
class ControlConfig(Section):
    """Control plane: the coordinator, its tokens, heartbeats, quorum and transport handles."""

    KEY: ClassVar[str] = "control"

    backend: Literal["embedded", "tcp", "redis"] = setting("embedded", flat="coord_backend")
    """Where the coordinator state lives: ``embedded`` inside the publisher, ``tcp`` a standalone
    ``hotweights coord serve``, ``redis`` in Redis (HA, with leader leases)."""

    endpoint: Optional[str] = setting(None, flat="coord_endpoint")
    """Address of a standalone coordinator, tcp://HOST:PORT (coord_backend=tcp). Several, comma-separated,
    for coordinators sharing one Redis: requests fail over to the one holding the fleet's lease."""

    redis_url: str = setting("redis://127.0.0.1:6379/0")
    """Redis URL for coord_backend=redis."""

    token: Optional[str] = setting(None, flat="coord_token")
    """Shared secret required on every mutating coordinator request."""

    handle_token: Optional[str] = setting(None, used_by=("shm", "cuda_ipc"))
    """When set, transport handles are HMAC-signed with this key and verified before use."""

    handle_ttl_s: float = setting(30.0, flat="handle_ttl", gt=0, unit="s", used_by=("shm", "cuda_ipc"))
    """Seconds a posted transport handle (shm segment name, CUDA-IPC handle) stays valid. A receiver's
    ack shortens it; expired handles are cleaned up together with the memory behind them."""

    heartbeat_interval_s: float = setting(1.0, gt=0, unit="s", used_by=("receiver",))
    """How often receivers send a heartbeat to the coordinator."""

    heartbeat_ttl_s: float = setting(5.0, gt=0, unit="s")
    """A receiver that sends no heartbeat for this long is evicted and stops counting toward quorum."""

    quorum: Literal["all", "majority"] = setting("all")
    """Precommit quorum needed before a version is committed: every live receiver, or a majority."""

    lease_s: float = setting(3.0, flat="coord_lease_ms", flat_scale=1000, flat_type=int, gt=0, unit="s",
                             used_by=("coordinator (redis)",))
    """Leader lease length when several coordinators share Redis. The variable is in milliseconds
    (default 3000); the section field holds seconds."""

    def _relations(self) -> list[str]:
        out = []
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            out.append(f"{self._label('heartbeat_ttl_s')} ({self.heartbeat_ttl_s}) must exceed "
                       f"{self._label('heartbeat_interval_s')} ({self.heartbeat_interval_s})")
        if self.backend == "tcp" and not self.endpoint:
            out.append(f"{self._label('backend')}=tcp needs {self._label('endpoint')} (tcp://HOST:PORT)")
        return out


@_section
class MetricsConfig(Section):
    """Metrics: the Prometheus exporter of publishers and receivers."""

    KEY: ClassVar[str] = "metrics"
    FLAT_PREFIX: ClassVar[str] = "metrics_"

    port: int = setting(0, min=0, max=65535)
    """Port of the Prometheus HTTP exporter; 0 turns it off."""

    host: str = setting("127.0.0.1")
    """Address the Prometheus exporter binds; loopback by default."""


@_section
class KVConfig(Section):
    """KV-cache migration: what a receiver does with registered KV caches when weights change."""

    KEY: ClassVar[str] = "kv"
    FLAT_PREFIX: ClassVar[str] = "kv_"
    USED_BY: ClassVar[tuple[str, ...]] = ("receiver",)

    policy: Literal["drop", "keep", "recompute", "migrate"] = setting("drop")
    """What a receiver does with registered KV caches when it applies a version: ``drop``
    invalidates them (exact), ``keep`` serves them stale (logged), ``recompute`` re-runs their
    prefill (exact), ``migrate`` transforms their layout (needs kv_allow_transforms)."""

    allow_transforms: bool = setting(False)
    """Allow the migrate policy to transform caches (dtype, RoPE, head order)."""

    head_map: Optional[str] = setting(None)
    """Inline JSON list: permutation along the cache's head axis (``new[j] = old[map[j]]``) for
    caches in the other head order; its length is num_key_value_heads (compact cache) or
    num_attention_heads (cache with repeated KV heads). Empty derives it from kv_head_order."""

    head_map_file: Optional[str] = setting(None)
    """Path of a JSON file with the head permutation (instead of kv_head_map)."""

    head_order: Literal["grouped", "interleaved"] = setting("grouped")
    """Head order of the serving engine's cache; a derived map converts the other order into it."""

    def _relations(self) -> list[str]:
        if self.head_map is not None and self.head_map_file is not None:
            return [f"set only one of {self._label('head_map')} and {self._label('head_map_file')}"]
        return []


@_section
class OptimConfig(Section):
    """Optimizer state on resume: what happens to moments of parameters whose weights changed under them."""

    KEY: ClassVar[str] = "optim"
    FLAT_PREFIX: ClassVar[str] = "opt_"
    USED_BY: ClassVar[tuple[str, ...]] = ("trainer callbacks",)

    policy: Literal["preserve", "reset", "attenuate"] = setting("preserve")
    """Optimizer state for parameters whose weights changed under it: keep, reset or attenuate."""

    attenuation: float = setting(0.5, min=0.0, max=1.0)
    """Factor applied to every moment tensor of updated parameters under the attenuate policy; the
    first Adam update then scales by sqrt(attenuation)."""


SECTIONS: tuple[type[Section], ...] = (
    CoreConfig, ReceiversConfig, DeltaSyncConfig, AsyncPushConfig, PeftSyncConfig, WindowConfig,
    CudaIpcConfig, TorchConfig, GpuConfig, MpiConfig, UcxConfig, ControlConfig, MetricsConfig, KVConfig,
    OptimConfig,
)
"""Every section, in the order docs/TUNING.md lists them."""

__all__ = [c.__name__ for c in SECTIONS] + ["SECTIONS", "TransportName", "DTYPE_NAMES", "WINDOWED"]
