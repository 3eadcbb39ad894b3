"""Which torch.distributed backend the ``torch`` transport's group uses, and how it is built.

- gloo: CPU tensors, always there; the path every other choice falls back to.
- nccl: CUDA, and ROCm (where torch's nccl backend is RCCL).
- ccl: Intel XPU through ``oneccl_bindings_for_pytorch``.

Every member reports what it can run in its hello; the publisher picks one all members share
(:func:`pick_backend`, pure, unit tested) and logs why whenever it falls back to gloo. Groups are
built straight from a store (``ProcessGroupGloo(store, rank, size)`` and friends), never from the
default process group, so the trainer's own data-parallel world is untouched.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, Iterable, Optional

from ..errors import TransportUnavailableError

log = logging.getLogger(__name__)

PREFERENCE = ("nccl", "ccl", "gloo")
DEVICE_OF = {"gloo": "cpu", "nccl": "cuda", "ccl": "xpu"}
GLOO_DEVICES = 2
"""TCP connections per peer in a gloo group (measured here: 1 GiB in 32 MiB chunks went from ~55% to
~75% of one big dist.broadcast with two). Every member must use the same count."""


def local_backends() -> dict[str, str]:
    """Backend -> why it is (un)usable here. Usable ones map to "ok"."""
    import torch
    import torch.distributed as dist

    out: dict[str, str] = {}
    out["gloo"] = "ok" if dist.is_gloo_available() else "torch was built without gloo"
    if not dist.is_nccl_available():
        out["nccl"] = "torch was built without nccl"
    elif not torch.cuda.is_available():
        out["nccl"] = "no CUDA/ROCm device visible"
    else:
        out["nccl"] = "ok"
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        out["ccl"] = "no Intel XPU device visible"
    else:
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)

            out["ccl"] = "ok"
        except ImportError:
            out["ccl"] = "oneccl_bindings_for_pytorch is not installed"
    return out


def usable(backends: dict[str, str]) -> list[str]:
    return [b for b in PREFERENCE if backends.get(b) == "ok"]


def pick_backend(requested: str, local: Iterable[str], members: dict[str, Iterable[str]]) -> tuple[str, str]:
    """(backend, reason) for a group of the publisher (``local``) and ``members`` (rid -> usable).

    ``requested`` is ``auto`` or a backend name. The result is always one every member can run;
    ``reason`` explains a fallback to gloo (empty when nothing fell back).
    """
    local = set(local)
    common = set(local)
    for caps in members.values():
        common &= set(caps)

    def why_not(b: str) -> str:
        if b not in local:
            return f"{b} is not usable on the publisher"
        lacking = sorted(rid for rid, caps in members.items() if b not in set(caps))
        return f"{b} is not usable on receiver(s) {', '.join(lacking)}"

    if "gloo" not in common:
        raise TransportUnavailableError(
            "no torch.distributed backend is usable by the publisher and every receiver: " + why_not("gloo"))
    if requested != "auto":
        return (requested, "") if requested in common else ("gloo", why_not(requested))
    for b in PREFERENCE:
        if b in common:
            accelerators = [a for a in PREFERENCE[:PREFERENCE.index(b)] if a in local]
            return b, "; ".join(why_not(a) for a in accelerators)
    raise AssertionError("unreachable: gloo is common")


def make_group(backend: str, store: Any, rank: int, size: int, timeout_s: float, hostname: Optional[str]) -> Any:
    """A process group of ``size`` ranks over ``store``; collective over exactly those ranks."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        make = (lambda: dist.ProcessGroupGloo.create_device(hostname=hostname)) if hostname else \
            dist.ProcessGroupGloo.create_default_device
        # Two devices = two TCP connections per peer; consecutive broadcasts alternate between them,
        # so one chunk's transfer overlaps the next one's setup.
        opts._devices = [make() for _ in range(GLOO_DEVICES)]
        return dist.ProcessGroupGloo(store, rank, size, opts)
    if backend == "nccl":  # pragma: no cover - needs a GPU
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    if backend == "ccl":  # pragma: no cover - needs an Intel XPU
        import oneccl_bindings_for_pytorch  # noqa: F401

        creator = dist.Backend._plugins["CCL"].creator_fn
        return creator(store, rank, size, timeout)
    raise TransportUnavailableError(f"unknown torch.distributed backend {backend!r}")


def device_for(backend: str) -> str:
    return DEVICE_OF[backend]


__all__ = ["local_backends", "usable", "pick_backend", "make_group", "device_for", "PREFERENCE"]
