"""Trainer side: after each committed version, tell a vLLM engine to load it (one call per version).

:class:`VLLMUpdater` drives vLLM's own weight-update API, so it works with whatever vLLM exposes:

* an in-process ``vllm.LLM`` (colocated training),
* the URL of a ``vllm serve`` started with ``--weight-transfer-config '{"backend": "hotweights"}'``
  and ``VLLM_SERVER_DEV_MODE=1`` (the RL routes), through vLLM's ``HTTPVLLMWeightSyncClient``,
* any object with the four methods of vLLM's ``VLLMWeightSyncClient`` protocol.

Per version it calls ``start_weight_update``, ``update_weights({"version": v, "timeout_s": ...})``,
``finish_weight_update(str(v))`` and resets the prefix cache (KV computed with the old weights must
not be reused). The bytes never go through these calls: the engine's workers already staged the
version from the hotweights endpoint. Each call is bounded: the worker waits at most
``timeout_s``, and an HTTP request at most ``timeout_s`` plus :data:`HTTP_MARGIN_S`.

Adapter mode (``config.peft_mode == "adapter"`` and ``peft_model`` a PeftModel, or ``init_info`` with
``lora_dir``): the workers write each version as a peft adapter directory (:mod:`.lora`) and leave
the base weights alone; after the round the updater has the engine load it as a LoRA adapter, before
the prefix cache is reset:

* an ``LLM``: ``llm.llm_engine.add_lora`` of a new ``LoRARequest`` per version, then the previous one
  removed; generation code passes :attr:`VLLMUpdater.lora_request` to ``llm.generate``;
* a ``vllm serve`` URL (started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``POST
  /v1/load_lora_adapter`` with ``load_inplace`` under one name, :attr:`VLLMUpdater.lora_model`, which
  clients request as the ``model``; ``lora_dir`` must then be given, a directory on the server's host.

A sync client other than these has no adapter API here: a ConfigError.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Optional

from ...config import SyncConfig
from ...errors import ConfigError, HotweightsError, InferenceUpdateError
from ...peft_sync import has_peft_layers
from ...source import unwrap_model

log = logging.getLogger(__name__)

HTTP_MARGIN_S = 30.0
"""Extra seconds an HTTP request may take beyond the worker's deadline (queueing, a busy server)."""


def _describe(target: Any) -> str:
    return target if isinstance(target, str) else type(target).__name__


class VLLMUpdater:
    """Applies committed hotweights versions to one vLLM engine.

    ``target``: an ``LLM``, a ``vllm serve`` base URL (``http://host:port``), or a
    ``VLLMWeightSyncClient``. ``endpoint``: the hotweights endpoint the workers follow.
    ``init_info``: extra SyncConfig overrides sent to the workers with the endpoint.
    ``peft_model``: the trainer's PeftModel; with ``config.peft_mode == "adapter"`` it turns on
    adapter mode, its active adapter's config goes to the workers. ``lora_dir``: where the engine's
    rank 0 writes the adapter versions (default: a new temporary directory, right for an in-process
    ``LLM``). ``lora_name``: the adapters' names are ``f"{lora_name}-v{version}"``.
    """

    def __init__(self, target: Any, endpoint: str, *, config: Optional[SyncConfig] = None,
                 init_info: Optional[dict[str, Any]] = None, peft_model: Any = None,
                 lora_dir: Optional[str] = None, lora_name: str = "hotweights"):
        self.config = config if config is not None else SyncConfig.from_env()
        self.endpoint = endpoint
        self.target = _describe(target)
        self.init_info = {"endpoint": endpoint, **(init_info or {})}
        if (peft_model is not None and self.config.peft_mode == "adapter" and "lora_dir" not in self.init_info
                and has_peft_layers(peft_model)):
            from .lora import lora_init_info

            if lora_dir is None and isinstance(target, str):
                raise ConfigError(f"adapter mode (peft_mode=adapter) into the `vllm serve` at {target} needs "
                                  "lora_dir=, a directory on the server's host where its workers write the "
                                  "adapter versions: pass vllm=VLLMUpdater(url, endpoint, config=..., "
                                  "peft_model=model, lora_dir=...)")
            self.init_info.update(lora_init_info(unwrap_model(peft_model),
                                                 lora_dir or tempfile.mkdtemp(prefix="hotweights-lora-")))
        self.lora_dir: Optional[str] = self.init_info.get("lora_dir")
        """Adapter mode: where the engine writes adapter versions; None for base-weight updates."""
        self.lora_name = lora_name
        self.lora_request: Any = None
        """Adapter mode into an ``LLM``: vLLM's ``LoRARequest`` of the live version (None before it)."""
        self.lora_model: Optional[str] = None
        """Adapter mode: the name the live adapter is served under (the OpenAI ``model`` of a server)."""
        self._reset_prefix_cache = None
        self._load_adapter_http = None
        if self.lora_dir is not None:
            self._check_lora_target(target)
        if isinstance(target, str):
            if not target.startswith(("http://", "https://")):
                raise ConfigError(f"vLLM target {target!r} is not an http(s) URL of a `vllm serve`")
            from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

            base = target.rstrip("/")
            self.client: Any = HTTPVLLMWeightSyncClient(base, timeout=self.config.timeout_s + HTTP_MARGIN_S)
            self._reset_prefix_cache = lambda: _post(base + "/reset_prefix_cache",
                                                     self.config.timeout_s + HTTP_MARGIN_S)
            self._load_adapter_http = lambda path: _post(
                base + "/v1/load_lora_adapter", self.config.timeout_s + HTTP_MARGIN_S,
                {"lora_name": self.lora_name, "lora_path": path, "load_inplace": True})
        else:
            missing = [m for m in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                                   "finish_weight_update") if not callable(getattr(target, m, None))]
            if missing:
                raise ConfigError(f"vLLM target {type(target).__name__} lacks {', '.join(missing)}: pass a "
                                  "vllm.LLM, a `vllm serve` URL or a VLLMWeightSyncClient")
            self.client = _OfflineClient(target) if hasattr(target, "llm_engine") else target
            reset = getattr(target, "reset_prefix_cache", None)
            self._reset_prefix_cache = reset if callable(reset) else None
        self.initialized = False
        self.version = 0
        self.last_seconds = 0.0

    def init(self) -> None:
        """Point the engine's workers at the endpoint (once; they stage versions from then on)."""
        self._call(0, "init_weight_transfer_engine", self.init_info)
        self.initialized = True
        log.info("vLLM engine %s follows %s", self.target, self.endpoint)

    def update(self, version: int) -> None:
        """Make ``version`` (or a newer committed one) live in the engine, or raise InferenceUpdateError."""
        if not self.initialized:
            self.init()
        t0 = time.perf_counter()
        self._call(version, "start_weight_update")
        self._call(version, "update_weights", {"version": int(version), "timeout_s": self.config.timeout_s})
        self._call(version, "finish_weight_update", str(version))
        if self.lora_dir is not None:
            # Before the reset: a server reloads the adapter in place under the same id, and KV computed
            # with the previous version in between must not be reused.
            self._serve_adapter(int(version))
        if self._reset_prefix_cache is not None:
            self._call(version, "reset_prefix_cache")
        self.version = int(version)
        self.last_seconds = time.perf_counter() - t0
        log.info("vLLM engine %s is on version %d (%.1f ms)", self.target, version, self.last_seconds * 1e3)

    def _check_lora_target(self, target: Any) -> None:
        from .lora import check_engine
        from .options import parse_init_info

        lora = parse_init_info(self.init_info).lora
        assert lora is not None  # lora_dir is set, and parse_init_info raised on anything missing
        if isinstance(target, str):
            return  # the server's workers check their engine when they are initialised
        if not hasattr(target, "llm_engine"):
            raise ConfigError(f"adapter mode (peft_mode=adapter) into vLLM loads adapters into a vllm.LLM or "
                              f"a `vllm serve` URL; {self.target} is neither: publish with peft_mode=merged "
                              "(HOTWEIGHTS_PEFT_MODE=merged) for it")
        # Refused here, before any worker is touched, when the engine cannot serve the adapter.
        check_engine(target.llm_engine.vllm_config.lora_config, lora)

    def _serve_adapter(self, version: int) -> None:
        """Load the version's adapter directory into the engine, then drop the previous adapter."""
        from .lora import adapter_path, request

        assert self.lora_dir is not None
        if self._load_adapter_http is not None:  # the server's host has the directory, not this one
            self._call(version, "load_lora_adapter", adapter_path(self.lora_dir, version),
                       fn=self._load_adapter_http)
            self.lora_model = self.lora_name
            return
        if not os.path.isdir(adapter_path(self.lora_dir, version)):
            # The workers load the newest committed version >= the one asked for; with one commit hook
            # per version they are the same, so a missing directory means the engine moved past it.
            raise InferenceUpdateError(version, f"vLLM engine {self.target}: adapter version {version} "
                                                f"was not written to {self.lora_dir}; the engine loaded "
                                                "another one")
        new = request(self.lora_name, version, self.lora_dir)
        if self._call(version, "add_lora", new) is False:
            # vLLM keeps an adapter it holds under this id (from another directory) and loads nothing;
            # finish_weight_update normally dropped it, but the new directory must win regardless.
            self._call(version, "remove_lora", version)
            self._call(version, "add_lora", new)
        old, self.lora_request = self.lora_request, new
        self.lora_model = new.lora_name
        if old is not None and old.lora_int_id != version:
            self._call(version, "remove_lora", old.lora_int_id)

    def __call__(self, result: Any) -> None:
        """Commit hook: ``publisher.add_commit_hook(updater)`` applies each published version."""
        self.update(result.version)

    def _call(self, version: int, method: str, *args: Any, fn: Any = None) -> Any:
        if fn is None:
            fn = self._reset_prefix_cache if method == "reset_prefix_cache" else getattr(self.client, method)
        try:
            return fn(*args)
        except HotweightsError as exc:
            if isinstance(exc, InferenceUpdateError):
                raise
            raise InferenceUpdateError(version, f"vLLM engine {self.target}: {method} failed for version "
                                                f"{version}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - vLLM and HTTP errors have no common base; keep the cause
            raise InferenceUpdateError(version, f"vLLM engine {self.target}: {method} failed for version "
                                                f"{version}: {type(exc).__name__}: {_short(exc)}") from exc


class _OfflineClient:
    """vLLM's ``LLM`` takes request dicts (``{"init_info": ...}``) where the sync-client protocol
    takes the info itself."""

    def __init__(self, llm: Any):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        self.llm.finish_weight_update(weight_version)

    def add_lora(self, lora_request: Any) -> bool:
        return self.llm.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm.llm_engine.remove_lora(lora_id)


def _short(exc: BaseException) -> str:
    text = str(exc)
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            text += f" ({response.text[:500]})"
        except Exception:  # noqa: BLE001 - the body is only a hint in an error message
            pass
    return text[:2000]


def _post(url: str, timeout: float, body: Optional[dict[str, Any]] = None) -> None:
    import requests

    response = requests.post(url, timeout=timeout, json=body)
    if response.status_code == 404 and url.endswith("_lora_adapter"):
        raise ConfigError(f"{url} is not served: start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                          "(and --enable-lora) for adapter mode")
    response.raise_for_status()
