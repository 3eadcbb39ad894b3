"""SyncConfig: typed fields, environment parsing, all problems reported at once.

The seed guide's names are checked with the generated docs, in test_docs.py."""

from __future__ import annotations

from dataclasses import fields

import pytest

from hotweights_trainer import ConfigError, SyncConfig
from hotweights_trainer.config import field_docs


def test_defaults_and_env_parsing():
    cfg = SyncConfig.from_env({"HOTWEIGHTS_BUCKET_MB": "8", "HOTWEIGHTS_IPC_ADAPT": "yes",
                               "HOTWEIGHTS_SEND_DTYPE": "bfloat16", "HOTWEIGHTS_TRANSPORT": "shm",
                               "HOTWEIGHTS_KV_HEAD_MAP": ""})
    assert cfg.bucket_mb == 8 and cfg.ipc_adapt is True and cfg.transport == "shm"
    assert cfg.send_dtype == "bfloat16" and cfg.kv_head_map is None
    assert SyncConfig().ipc_inflight_buckets == 4 and SyncConfig().ipc_target_bucket_ms == 250
    assert SyncConfig().bcast_chunk_mb == 32 and SyncConfig().ipc_copy_chunk_mb == 16


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as info:
        SyncConfig.from_env({"HOTWEIGHTS_BUCKET_MB": "lots", "HOTWEIGHTS_TIMEOUT_S": "-1",
                             "HOTWEIGHTS_ON_ERROR": "ignore", "HOTWEIGHTS_OPT_ATTENUATION": "2"})
    probs = info.value.problems
    assert len(probs) == 4
    text = str(info.value)
    for name in ("HOTWEIGHTS_BUCKET_MB", "HOTWEIGHTS_TIMEOUT_S", "HOTWEIGHTS_ON_ERROR", "HOTWEIGHTS_OPT_ATTENUATION"):
        assert name in text


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="bucket_mb"):
        SyncConfig(bucket_mb=0)
    with pytest.raises(ConfigError, match="send_dtype"):
        SyncConfig(send_dtype="int8")
    with pytest.raises(ConfigError, match="ipc_min_inflight"):
        SyncConfig(ipc_min_inflight=8, ipc_max_inflight=2)


def test_unknown_variable_is_warned(caplog):
    SyncConfig.from_env({"HOTWEIGHTS_BUCKETMB": "8"})
    assert "HOTWEIGHTS_BUCKETMB" in caplog.text


def test_every_field_is_documented():
    assert set(field_docs()) == {f.name for f in fields(SyncConfig)}
