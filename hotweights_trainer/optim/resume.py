"""Resuming a run: compare the weights now loaded with the checkpoint's sidecar, apply the policy once.

Call :func:`apply_on_resume` after the optimizer state was loaded: ``HotweightsCallback`` does it for
HF ``Trainer`` (``on_train_begin`` runs after the Trainer loaded the checkpoint); with Accelerate call
it right after ``accelerator.load_state(dir)``; with a DeepSpeed engine after ``engine.load_checkpoint``.
Every rank calls it: each applies the policy to its own (replicated or partitioned) state.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

from ..config import SyncConfig
from .policy import PolicyReport, apply_policy, validate_policy
from .sidecar import compare, model_fingerprints, read_sidecar

log = logging.getLogger(__name__)


def apply_on_resume(model: Any, optimizer: Any, checkpoint_dir: Union[str, os.PathLike], *,
                    policy: Optional[str] = None, attenuation: Optional[float] = None,
                    config: Optional[SyncConfig] = None) -> PolicyReport:
    """Treat parameters whose bytes differ from the checkpoint's sidecar as updated; apply the policy.

    ``policy`` and ``attenuation`` default to ``SyncConfig.opt_policy`` / ``opt_attenuation``
    (``HOTWEIGHTS_OPT_POLICY``, ``HOTWEIGHTS_OPT_ATTENUATION``). Parameters the sidecar does not know
    count as updated (nothing proves they are unchanged). Raises SidecarError when the sidecar is
    missing or malformed, before anything is changed.
    """
    cfg = config if config is not None else SyncConfig.from_env()
    policy, attenuation = validate_policy(policy if policy is not None else cfg.opt_policy,
                                          cfg.opt_attenuation if attenuation is None else attenuation)
    sidecar = read_sidecar(checkpoint_dir)
    diff = compare(sidecar, model_fingerprints(model))
    report = apply_policy(optimizer, diff.updated + diff.new, policy=policy, attenuation=attenuation,
                          model=model)
    notes = []
    if diff.new:
        notes.append(f"{len(diff.new)} parameter(s) not in the sidecar, treated as updated: "
                     + ", ".join(diff.new[:10]) + (" ..." if len(diff.new) > 10 else ""))
    if diff.missing:
        notes.append(f"{len(diff.missing)} sidecar parameter(s) not in the model: "
                     + ", ".join(diff.missing[:10]) + (" ..." if len(diff.missing) > 10 else ""))
    for note in notes:
        log.warning("optimizer policy on resume: %s", note)
    report.notes.extend(notes)
    log.info("resume from %s (sidecar step %s, version %s): %d of %d parameters changed since the checkpoint",
             checkpoint_dir, sidecar.step, sidecar.version, len(diff.updated) + len(diff.new),
             len(diff.updated) + len(diff.new) + len(diff.unchanged))
    return report
