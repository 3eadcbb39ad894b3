"""The receiving path, in order: stage -> verify -> apply.

- :mod:`.staging`: a version's buckets are decoded, verified (header and payload checksums) and checked
  against the model's names, shapes and dtypes as they arrive, until the version is whole;
- :mod:`.device_bucket`: the same for buckets whose payload stays in device memory;
- :mod:`.shadow`: with delta sync, the private base copy that delta entries are decoded against;
- :mod:`.apply`: a committed version is copied into the model in place, on the host or on its device.

:mod:`hotweights_trainer.receiver` drives them from the transport's callbacks and the owner's ``poll``.
"""
