"""``SyncConfig``: every ``HOTWEIGHTS_*`` knob, typed, validated, read from the environment once.

Each field maps to the environment variable ``HOTWEIGHTS_<FIELD NAME IN UPPER CASE>``. The docstring
under each field is the documentation: ``docs/TUNING.md`` is generated from it
(``python scripts/gen_tuning_doc.py``), so the two never drift.

This is the only module that reads ``os.environ``. Everything else receives a ``SyncConfig``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import os
import typing
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, get_args, get_origin

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "HOTWEIGHTS_"

TransportName = Literal["auto", "shm", "torch", "mpi", "ucx", "cuda_ipc"]
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(kw_only=True, slots=True)
class SyncConfig:
    """All settings of hotweights_trainer. Construct directly, or with :meth:`from_env`."""

    # ---------------------------------------------------------------- core engine
    transport: TransportName = "auto"
    """Transport that moves buckets: auto, shm, torch, mpi, ucx or cuda_ipc. ``auto`` chooses from the
    endpoint and the environment and logs why. Applies to publishers and receivers."""

    bucket_mb: int = 32
    """Size of one bucket in MiB. Tensors are packed into flat buckets of this size (large tensors are
    split across buckets), so a sync costs one round trip per bucket, never per tensor."""

    timeout_s: float = 60.0
    """Deadline in seconds for every blocking wait: waiting for receivers to stage a version, for a
    version to arrive, for a free buffer, for a peer to answer. A dead peer surfaces as
    SyncTimeoutError or PeerLostError within this time."""

    send_dtype: Optional[str] = None
    """Cast floating-point tensors to this dtype on the trainer before sending (float32, float16,
    bfloat16). Empty keeps each tensor's own dtype. bfloat16 halves the bytes of fp32 weights when
    inference runs in bf16."""

    on_error: Literal["raise", "warn"] = "raise"
    """What a failed push does on the trainer side: ``raise`` stops training with the error, ``warn``
    logs it, counts it in hotweights_errors_total and lets training go on."""

    max_message_mb: int = 64
    """Upper bound in MiB for one control message or bucket header decoded from a peer. Anything larger
    is rejected before it is read."""

    # ---------------------------------------------------------------- receivers at the start and end of a run
    min_receivers: int = 0
    """Receivers a publisher waits for before it sends its first version; 0 sends at once, to whoever
    is connected. Every callback (HF Trainer, Accelerate, DeepSpeed) publishes through a publisher,
    so it waits too. The wait happens at the first push, not at start-up, so training overlaps the
    inference side's start. It logs progress while it waits."""

    receiver_wait_s: float = 300.0
    """Deadline in seconds of the wait for min_receivers; past it the first publish raises
    SyncTimeoutError naming the endpoint. Separate from timeout_s because an inference process may
    take minutes to start (import torch, load the model, start an engine), which says nothing about
    a dead peer."""

    linger_s: float = 30.0
    """Seconds a closing publisher (including the callbacks at the end of training) keeps serving its
    last version while a connected receiver has not committed it yet, or while no receiver has (one
    that is still starting gets it when it connects). It returns as soon as they all have; 0 closes
    at once. 30 s covers a receiver still importing torch and loading a small model, and a vLLM
    engine start (17-28 s measured for a tiny model on a 2-core CPU); raise it for slower starts."""

    exit_linger_s: float = 0.0
    """Seconds a publisher that was never closed lingers (as for linger_s) when the interpreter exits,
    where it is closed for you so its shared memory is freed. 0 (default): close at once, so a script
    that ends without ``close()`` exits promptly; raise it to let receivers still starting get the
    last version."""

    # ---------------------------------------------------------------- delta sync and async publishing
    delta: Literal["auto", "off", "always"] = "auto"
    """Sparse delta sync. ``auto`` sends a full snapshot first and then only changed elements when that
    is smaller; ``off`` always sends dense tensors; ``always`` forces the delta encoding after the
    first full sync even where dense would be smaller."""

    delta_zstd: bool = False
    """Run delta payloads through zstandard (needs the ``zstandard`` package). The delta format is
    already near the entropy of small updates, so this saves only a few percent (about 1-3% on
    bf16 fine-tuning updates); it may help on very slow links."""

    async_publish: bool = False
    """Publish from a background thread while the next training step runs. The snapshot is taken at
    the step boundary, so a version always equals the weights of one step."""

    max_staleness: int = 1
    """With async_publish: how many versions a push may still be in flight when the next step boundary
    is reached before ``staleness_policy`` applies."""

    staleness_policy: Literal["wait", "skip"] = "wait"
    """With async_publish, when the previous push is still running at a step boundary: ``wait`` blocks
    until it finishes, ``skip`` drops this step's version (never a half-sent one)."""

    # ---------------------------------------------------------------- PEFT / LoRA models
    peft_mode: Literal["merged", "adapter"] = "merged"
    """How a model holding PEFT adapters (peft's get_peft_model) is sent. ``merged``: every tensor under
    the base model's name with each LoRA layer's weight sent as W + scaling * (B @ A), exactly what
    merge_and_unload() gives, computed into the outgoing data (the trainer's weights are never
    written); for receivers holding the plain base model. ``adapter``: only the adapter tensors,
    modules_to_save copies and other trainable tensors, under the PeftModel's names; for receivers
    holding the same PeftModel. Models without PEFT layers are unaffected."""

    # ---------------------------------------------------------------- in-flight window (pipelining transports)
    ipc_inflight_buckets: int = 4
    """Base window: how many buckets may be in flight at once on pipelining transports."""

    ipc_inflight_bytes: int = 0
    """Cap on the bytes in flight at once; 0 turns the cap off."""

    ipc_adapt: bool = False
    """Adapt the window so that one bucket takes about ipc_target_bucket_ms, within
    ipc_min_inflight..ipc_max_inflight."""

    ipc_target_bucket_ms: float = 250.0
    """Target time per bucket in milliseconds for the adaptive window."""

    ipc_min_inflight: int = 1
    """Lower bound of the adaptive window."""

    ipc_max_inflight: int = 16
    """Upper bound of the adaptive window."""

    # ---------------------------------------------------------------- CUDA-IPC copy tuning
    ipc_copy_autotune: bool = False
    """Pick larger copy chunks and more CUDA streams when peer access or NVLink is present."""

    ipc_copy_chunk_mb: int = 16
    """Chunk size in MiB of the device-side scatter from a staged bucket into parameters."""

    ipc_copy_streams: int = 2
    """Number of CUDA streams the device-side scatter uses."""

    use_gds: bool = False
    """Read checkpoint shards straight into device buckets with GPUDirect Storage (needs CuPy and
    KvikIO); falls back to CPU assembly plus host-to-device copy and logs why."""

    handle_ttl: float = 30.0
    """Seconds a posted transport handle (shm segment name, CUDA-IPC handle) stays valid. A receiver's
    ack shortens it; expired handles are cleaned up together with the memory behind them."""

    # ---------------------------------------------------------------- broadcast transports (torch.distributed)
    bcast_chunk_mb: int = 32
    """Size in MiB of one broadcast block on the torch transport."""

    bcast_prefetch: bool = False
    """On the root, assemble the next bucket while the current one is being broadcast."""

    bcast_autotune: bool = False
    """Run a short broadcast microbenchmark across the group and set bcast_chunk_mb from it."""

    bcast_autotune_mb: int = 128
    """Data size in MiB of the broadcast microbenchmark."""

    bcast_autotune_chunks_mb: str = "8,16,32,64"
    """Comma-separated chunk sizes in MiB the broadcast microbenchmark tries."""

    torch_backend: Literal["auto", "gloo", "nccl", "ccl"] = "auto"
    """Backend of the torch transport's process group. ``auto`` takes nccl on CUDA/ROCm, ccl on Intel
    XPU and gloo otherwise, falling back to gloo with a logged reason."""

    # ---------------------------------------------------------------- device-side scatter (broadcast path)
    gpu_copy_autotune: bool = False
    """Heuristic tuning of device scatter chunks and streams from peer access (CUDA)."""

    gpu_copy_chunk_mb: int = 16
    """Chunk size in MiB of per-copy device scatter on the broadcast path."""

    gpu_copy_streams: int = 2
    """Number of CUDA streams for the device scatter on the broadcast path."""

    gpu_copy_micro: bool = False
    """Run a local device-copy microbenchmark and set gpu_copy_chunk_mb and gpu_copy_streams from it."""

    gpu_copy_autotune_mb: int = 256
    """Data size in MiB of the device-copy microbenchmark."""

    gpu_copy_micro_chunks_mb: str = "4,8,16,32,64"
    """Comma-separated chunk sizes in MiB the device-copy microbenchmark tries."""

    gpu_copy_micro_streams: str = "1,2,4"
    """Comma-separated stream counts the device-copy microbenchmark tries."""

    # ---------------------------------------------------------------- MPI
    mpi_window: int = 4
    """Non-blocking broadcasts kept in flight by the MPI transport (CLI: --window)."""

    mpi_chunk_mb: int = 16
    """Size in MiB of one MPI broadcast chunk (CLI: --mpi-chunk-mb)."""

    # ---------------------------------------------------------------- UCX
    ucx_chunk_mb: int = 16
    """Size in MiB of one UCX send."""

    ucx_concurrency: int = 0
    """Concurrent UCX sends per receiver; 0 picks automatically."""

    ucx_inflight_limit_mb: int = 256
    """Cap in MiB on UCX bytes in flight per receiver."""

    ucx_retries: int = 3
    """How often a failed UCX connect or send is retried before the error surfaces."""

    ucx_retry_delay_ms: int = 100
    """Delay in milliseconds between UCX retries."""

    ucx_net_devices: Optional[str] = None
    """UCX network devices (UCX_NET_DEVICES); empty falls back to NCCL_IB_HCA, then to UCX's choice."""

    ucx_options: str = "TCP_TX_SEG_SIZE=1m,TCP_RX_SEG_SIZE=1m"
    """Extra UCX options as comma-separated KEY=VALUE (the UCX_ prefix is optional). They override
    UCX's own UCX_* variables. The default 1 MiB TCP segments move large buffers several times faster
    than UCX's 64 KiB default."""

    ucx_backend: Literal["auto", "ucp", "ucxx", "ucxx-async"] = "auto"
    """Python binding of the ucx transport: ``auto`` takes ucx-py (ucp) when importable, else ucxx's
    core API; ``ucxx-async`` drives ucxx through the asyncio API ucx-py shares."""

    # ---------------------------------------------------------------- control plane
    coord_backend: Literal["embedded", "tcp", "redis"] = "embedded"
    """Where the coordinator state lives: ``embedded`` inside the publisher, ``tcp`` a standalone
    ``hotweights coord serve``, ``redis`` in Redis (HA, with leader leases)."""

    coord_endpoint: Optional[str] = None
    """Address of a standalone coordinator, tcp://HOST:PORT (coord_backend=tcp). Several, comma-separated,
    for coordinators sharing one Redis: requests fail over to the one holding the fleet's lease."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL for coord_backend=redis."""

    coord_token: Optional[str] = None
    """Shared secret required on every mutating coordinator request."""

    handle_token: Optional[str] = None
    """When set, transport handles are HMAC-signed with this key and verified before use."""

    heartbeat_interval_s: float = 1.0
    """How often receivers send a heartbeat to the coordinator."""

    heartbeat_ttl_s: float = 5.0
    """A receiver that sends no heartbeat for this long is evicted and stops counting toward quorum."""

    quorum: Literal["all", "majority"] = "all"
    """Precommit quorum needed before a version is committed: every live receiver, or a majority."""

    coord_lease_ms: int = 3000
    """Leader lease length in milliseconds when several coordinators share Redis."""

    # ---------------------------------------------------------------- metrics
    metrics_port: int = 0
    """Port of the Prometheus HTTP exporter; 0 turns it off."""

    metrics_host: str = "127.0.0.1"
    """Address the Prometheus exporter binds; loopback by default."""

    # ---------------------------------------------------------------- KV-cache migration
    kv_policy: Literal["drop", "keep", "recompute", "migrate"] = "drop"
    """What a receiver does with registered KV caches when it applies a version: ``drop``
    invalidates them (exact), ``keep`` serves them stale (logged), ``recompute`` re-runs their
    prefill (exact), ``migrate`` transforms their layout (needs kv_allow_transforms)."""

    kv_allow_transforms: bool = False
    """Allow the migrate policy to transform caches (dtype, RoPE, head order)."""

    kv_head_map: Optional[str] = None
    """Inline JSON list: permutation along the cache's head axis (``new[j] = old[map[j]]``) for
    caches in the other head order; its length is num_key_value_heads (compact cache) or
    num_attention_heads (cache with repeated KV heads). Empty derives it from kv_head_order."""

    kv_head_map_file: Optional[str] = None
    """Path of a JSON file with the head permutation (instead of kv_head_map)."""

    kv_head_order: Literal["grouped", "interleaved"] = "grouped"
    """Head order of the serving engine's cache; a derived map converts the other order into it."""

    # ---------------------------------------------------------------- optimizer state on resume
    opt_policy: Literal["preserve", "reset", "attenuate"] = "preserve"
    """Optimizer state for parameters whose weights changed under it: keep, reset or attenuate."""

    opt_attenuation: float = 0.5
    """Factor applied to every moment tensor of updated parameters under the attenuate policy; the
    first Adam update then scales by sqrt(attenuation)."""

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Every invalid value, as readable sentences naming the field and its variable."""
        out: list[str] = []
        hints = _type_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            out.extend(_check_type(f.name, hints[f.name], value))
        if out:
            return out  # range checks below assume the types are right
        for name in (
            "bucket_mb", "max_message_mb", "ipc_inflight_buckets", "ipc_min_inflight",
            "ipc_max_inflight", "ipc_copy_chunk_mb", "ipc_copy_streams", "bcast_chunk_mb",
            "bcast_autotune_mb", "gpu_copy_chunk_mb", "gpu_copy_streams", "gpu_copy_autotune_mb",
            "mpi_window", "mpi_chunk_mb", "ucx_chunk_mb", "ucx_inflight_limit_mb", "max_staleness",
        ):
            if getattr(self, name) < 1:
                out.append(f"{_label(name)} must be >= 1, got {getattr(self, name)!r}")
        for name in ("ipc_inflight_bytes", "ucx_concurrency", "ucx_retries", "ucx_retry_delay_ms",
                     "min_receivers"):
            if getattr(self, name) < 0:
                out.append(f"{_label(name)} must be >= 0, got {getattr(self, name)!r}")
        for name in ("timeout_s", "ipc_target_bucket_ms", "handle_ttl", "heartbeat_interval_s",
                     "heartbeat_ttl_s", "coord_lease_ms", "receiver_wait_s"):
            if not getattr(self, name) > 0:
                out.append(f"{_label(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("linger_s", "exit_linger_s"):
            if not getattr(self, name) >= 0:
                out.append(f"{_label(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.metrics_port <= 65535:
            out.append(f"{_label('metrics_port')} must be 0..65535, got {self.metrics_port!r}")
        if self.ipc_min_inflight > self.ipc_max_inflight:
            out.append(
                f"{_label('ipc_min_inflight')} ({self.ipc_min_inflight}) must not exceed "
                f"{_label('ipc_max_inflight')} ({self.ipc_max_inflight})"
            )
        if self.send_dtype is not None and self.send_dtype not in DTYPE_NAMES:
            out.append(f"{_label('send_dtype')} must be one of {', '.join(DTYPE_NAMES)} or empty, "
                       f"got {self.send_dtype!r}")
        if not 0.0 <= self.opt_attenuation <= 1.0:
            out.append(f"{_label('opt_attenuation')} must be within [0, 1], got {self.opt_attenuation!r}")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s and not out:
            out.append(f"{_label('heartbeat_ttl_s')} ({self.heartbeat_ttl_s}) must exceed "
                       f"{_label('heartbeat_interval_s')} ({self.heartbeat_interval_s})")
        for name in ("bcast_autotune_chunks_mb", "gpu_copy_micro_chunks_mb", "gpu_copy_micro_streams"):
            try:
                parse_int_list(getattr(self, name))
            except ValueError as exc:
                out.append(f"{_label(name)}: {exc}")
        if self.kv_head_map is not None and self.kv_head_map_file is not None:
            out.append(f"set only one of {_label('kv_head_map')} and {_label('kv_head_map_file')}")
        if self.coord_backend == "tcp" and not self.coord_endpoint:
            out.append(f"{_label('coord_backend')}=tcp needs {_label('coord_endpoint')} (tcp://HOST:PORT)")
        return out

    # ------------------------------------------------------------------------------------------------
    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mb << 20

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

    @property
    def torch_send_dtype(self):
        """``send_dtype`` as a ``torch.dtype`` (or None)."""
        if self.send_dtype is None:
            return None
        import torch

        return getattr(torch, self.send_dtype)

    def replace(self, **changes: Any) -> "SyncConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def env_name(cls, field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "SyncConfig":
        """Read every ``HOTWEIGHTS_*`` variable once and build a validated config.

        ``overrides`` win over the environment. All problems, parse errors and range errors alike,
        are raised together in one :class:`ConfigError`. Unknown ``HOTWEIGHTS_*`` names are logged
        as a warning, because they are usually typos.
        """
        env = os.environ if environ is None else environ
        hints = _type_hints()
        kwargs: dict[str, Any] = {}
        problems: list[str] = []
        known = {cls.env_name(f.name) for f in fields(cls)}
        for f in fields(cls):
            var = cls.env_name(f.name)
            if var in env:
                try:
                    kwargs[f.name] = _parse(hints[f.name], env[var])
                except ValueError as exc:
                    problems.append(f"{var}={env[var]!r}: {exc}")
        if "ucx_net_devices" not in kwargs and env.get("NCCL_IB_HCA"):
            kwargs["ucx_net_devices"] = env["NCCL_IB_HCA"]
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known
                         and k not in NON_CONFIG_VARIABLES)
        if unknown:
            log.warning("ignoring unknown environment variables (typo?): %s", ", ".join(unknown))
        kwargs.update(overrides)
        try:
            cfg = cls(**{k: v for k, v in kwargs.items() if not _failed(k, problems)})
        except ConfigError as exc:
            raise ConfigError(problems + exc.problems) from None
        except TypeError as exc:  # an override that is not a field
            raise ConfigError(problems + [str(exc)]) from None
        if problems:
            raise ConfigError(problems)
        return cfg


NON_CONFIG_VARIABLES: Mapping[str, str] = {
    "HOTWEIGHTS_REQUIRE": "read by the test suite, not the library: a comma list of optional parts "
                          "(mpi, ucx, redis, deepspeed, hf, vllm, peft, trl) whose tests must fail instead of skipping",
}
"""``HOTWEIGHTS_*`` names that are deliberately not SyncConfig fields, each with the reason
(docs/TUNING.md lists them)."""


def _failed(name: str, problems: list[str]) -> bool:
    return any(p.startswith(SyncConfig.env_name(name) + "=") for p in problems)


def _label(name: str) -> str:
    return f"{name} ({SyncConfig.env_name(name)})"


@lru_cache(maxsize=None)
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(SyncConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) is typing.Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parse(tp: Any, raw: str) -> Any:
    """Turn an environment string into a value of type ``tp`` (raises ValueError with a reason)."""
    inner, optional = _unwrap_optional(tp)
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


def _check_type(name: str, tp: Any, value: Any) -> list[str]:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        return [] if optional else [f"{_label(name)} must not be None"]
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        if value not in choices:
            return [f"{_label(name)} must be one of {', '.join(map(str, choices))}, got {value!r}"]
        return []
    if inner is bool:
        ok = isinstance(value, bool)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, inner)
    return [] if ok else [f"{_label(name)} must be {inner.__name__}, got {value!r}"]


def parse_int_list(text: str) -> list[int]:
    """Parse "8,16,32" into [8, 16, 32] (each > 0)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


@lru_cache(maxsize=None)
def field_docs() -> dict[str, str]:
    """The docstring written under each SyncConfig field, keyed by field name."""
    tree = ast.parse(inspect.getsource(SyncConfig))
    cls = tree.body[0]
    docs: dict[str, str] = {}
    body = cls.body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(
                nxt.value.value, str
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_sections() -> dict[str, str]:
    """The section comment (``# ---- title``) each field sits under, keyed by field name."""
    src = inspect.getsource(SyncConfig).splitlines()
    section = "general"
    out: dict[str, str] = {}
    names = {f.name for f in fields(SyncConfig)}
    for line in src:
        s = line.strip()
        if s.startswith("# ----") and s.strip("# -"):
            section = s.strip("# -").strip()
            continue
        head = s.split(":", 1)[0]
        if head in names and head not in out:
            out[head] = section
    return out


def default_of(name: str) -> Any:
    f = next(f for f in fields(SyncConfig) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


__all__ = ["SyncConfig", "field_docs", "field_sections", "default_of", "parse_int_list",
           "NON_CONFIG_VARIABLES", "ENV_PREFIX"]



# Environment variables set by MPI launchers (mpirun/mpiexec/srun with PMI) in every process they start.
MPI_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


def child_environ(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, for the processes the library starts (fleet hosts).
    Lives here because this is the one module that reads the environment."""
    return {**os.environ, **extra}


def launcher_facts(environ: Mapping[str, str] | None = None) -> dict[str, Optional[str]]:
    """What the process launcher says about this process (for transport auto-selection).

    Returns ``{"mpi_launcher": "VAR=value" or None}``. Lives here because this is the one module
    that reads the environment.
    """
    env = os.environ if environ is None else environ
    hit = next((f"{v}={env[v]}" for v in MPI_LAUNCHER_VARIABLES if v in env), None)
    return {"mpi_launcher": hit}
