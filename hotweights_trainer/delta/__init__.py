"""Sparse delta sync: send only the elements whose bytes changed since the version a receiver has.

* :mod:`.encoder` (publisher): per tensor range, a host snapshot of the bytes last sent (after the
  ``send_dtype`` cast) and a scratch buffer for the next version; finds changed elements bit-wise,
  encodes them with :mod:`hotweights_trainer.wire.delta`, falls back to dense where that is smaller.
* :mod:`.resync` (publisher): serves dense copies of ranges to a receiver whose base did not match
  (it missed a version, joined late, or its check after patching failed).
* :mod:`.shadow` (receiver): a private copy of the newest committed bytes of every range, the base
  that patches are applied to; patched ranges are verified with their xxh3 before staging.

Base bookkeeping is per range and per version: a delta entry names the version it applies to, and
a receiver applies it only when its own copy of that range is exactly that version (same publisher
session). Anything else becomes a resync request, never a wrong tensor.
"""
