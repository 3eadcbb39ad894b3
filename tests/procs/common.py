"""Deterministic tensors and modules shared by test processes (both sides compute the same bytes)."""

from __future__ import annotations

import json
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int8": torch.int8, "bool": torch.bool}


def mixed_spec(n_small: int = 40, big_elems: int = 600_000) -> list[list[Any]]:
    """Many small tensors of three float dtypes plus tensors larger than a 1 MiB bucket."""
    spec: list[list[Any]] = []
    for i in range(n_small):
        dt = ("float32", "float16", "bfloat16")[i % 3]
        spec.append([f"layers.{i}.w", dt, [7 + i % 5, 3 + i % 4]])
    spec += [["big.f32", "float32", [big_elems]], ["big.bf16", "bfloat16", [3, big_elems // 2]],
             ["big.f16", "float16", [big_elems]], ["scalar", "float32", []], ["empty", "float32", [0, 4]],
             ["counts", "int64", [17]]]
    return spec


def make_tensors(spec: list[list[Any]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, dt, shape in spec:
        dtype = DTYPES[dt]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(-100, 100, shape, generator=g).to(dtype)
        out[name] = t
    return out


class SpecModule(torch.nn.Module):
    """A module whose state dict has exactly the names of ``spec`` (floats as parameters)."""

    def __init__(self, spec: list[list[Any]]):
        super().__init__()
        for name, dt, shape in spec:
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            t = torch.zeros(shape, dtype=DTYPES[dt])
            if t.is_floating_point():
                mod.register_parameter(leaf, torch.nn.Parameter(t))
            else:
                mod.register_buffer(leaf, t)


def load_spec(path: str) -> list[list[Any]]:
    with open(path) as f:
        return json.load(f)
