"""Gather: what each rank contributes to a publish, whatever the sharding.

``publish_source`` runs on every rank. For ordinary (replicated) models only the main rank returns
the model; the other ranks return None and do nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ..source import unwrap_model


def publish_source(model: Any, *, is_main: bool, bucket_bytes: int) -> Optional[Iterable]:
    model = unwrap_model(model)
    if not is_main:
        return None
    return model
