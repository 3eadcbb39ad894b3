"""Optimizer state for resumed runs whose weights changed: preserve, reset or attenuate.

Public API::

    from hotweights_trainer.optim import apply_policy, apply_on_resume, write_sidecar, PolicyReport

* :func:`apply_policy` - apply a policy to given parameters (torch optimizers, Accelerate, DeepSpeed).
* :func:`write_sidecar` / :func:`read_sidecar` - per-parameter fingerprints stored with a checkpoint.
* :func:`apply_on_resume` - compare the loaded weights to the sidecar and apply the policy to the
  parameters whose bytes changed.
* :func:`expected_counts` / :func:`preview_checkpoint` - what ``hotweights opt-check`` prints.
"""

from .policy import POLICIES, PolicyReport, apply_policy, effective_update_scale, validate_policy
from .preview import expected_counts, preview_checkpoint
from .resume import apply_on_resume
from .sidecar import (SIDECAR_NAME, Comparison, Sidecar, compare, model_fingerprints, read_sidecar,
                      write_sidecar)

__all__ = ["POLICIES", "PolicyReport", "apply_policy", "effective_update_scale", "validate_policy",
           "expected_counts", "preview_checkpoint", "apply_on_resume", "SIDECAR_NAME", "Comparison",
           "Sidecar", "compare", "model_fingerprints", "read_sidecar", "write_sidecar"]
