"""Tensor names: stripping wrapper prefixes and applying a user ``name_map``.

DDP, ``torch.compile``, FSDP and activation checkpointing wrap modules and change parameter names.
Trainer and inference models rarely agree on these wrappers, so names are normalised on both sides.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

NameMap = Union[Mapping[str, str], Callable[[str], Optional[str]], None]

# Segments that only wrappers create; they are removed wherever they appear.
WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# DDP's prefix is a plain word that a real submodule could also use, so it is only removed in front.
LEADING_PREFIXES = ("module.",)


def strip_wrappers(name: str) -> str:
    for seg in WRAPPER_SEGMENTS:
        while seg in name:
            name = name.replace(seg, "")
    changed = True
    while changed:
        changed = False
        for prefix in LEADING_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
        for seg in WRAPPER_SEGMENTS:
            if name.startswith(seg):
                name = name[len(seg):]
                changed = True
    return name


def map_name(name: str, name_map: NameMap) -> Optional[str]:
    """Apply ``name_map`` then strip wrappers. ``None`` from a callable map means "skip this tensor"."""
    if name_map is not None:
        if callable(name_map):
            mapped = name_map(name)
            if mapped is None:
                return None
            name = mapped
        else:
            name = name_map.get(name, name)
    return strip_wrappers(name)
