"""Helpers shared by subcommands: JSON output, progress bars that respect non-TTY output."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable, Optional


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text(data))


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: Optional[bool] = None):
    """A tqdm progress bar on a TTY, the plain iterable otherwise."""
    if enabled is None:
        enabled = sys.stdout.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)
