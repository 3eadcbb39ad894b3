"""SyncConfig: sections and flat names, environment parsing, declared bounds, all problems at once.

The seed guide's names are checked with the generated docs, in test_docs.py."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import typing

import pytest

from hotweights_trainer import ConfigError, SyncConfig
from hotweights_trainer.config import (SECTIONS, SETTINGS, WINDOWED, ControlConfig, CoreConfig, TorchConfig,
                                       WindowConfig, field_docs, section_field_docs)
from hotweights_trainer.config.schema import unwrap_optional

TRANSPORTS = {"shm", "torch", "mpi", "ucx", "cuda_ipc"}


# ---------------------------------------------------------------- sections and flat names
def test_section_and_flat_access_agree():
    cfg = SyncConfig()
    assert cfg.core.timeout_s == cfg.timeout_s == 60.0
    assert cfg.torch.chunk_mb == cfg.bcast_chunk_mb == 32
    assert cfg.window.inflight_buckets == cfg.ipc_inflight_buckets == 4
    assert cfg.delta_sync.mode == cfg.delta == "auto"
    assert cfg.control.handle_ttl_s == cfg.handle_ttl == 30.0
    for s in SETTINGS:  # every flat name reads its section field (through the unit conversion, if any)
        assert getattr(cfg, s.flat) == s.to_flat(getattr(getattr(cfg, s.section.KEY), s.name)), s.flat


def test_flat_keywords_land_in_their_sections():
    cfg = SyncConfig(timeout_s=5, transport="shm", bcast_chunk_mb=64, mpi_window=2, kv_policy="keep")
    assert (cfg.core.timeout_s, cfg.core.transport, cfg.torch.chunk_mb, cfg.mpi.window,
            cfg.kv.policy) == (5, "shm", 64, 2, "keep")
    assert cfg.ucx == SyncConfig().ucx  # untouched sections keep their defaults


def test_sections_as_objects_or_dicts_and_flat_wins():
    cfg = SyncConfig(torch=TorchConfig(chunk_mb=8, prefetch=True), core={"bucket_mb": 4})
    assert cfg.bcast_chunk_mb == 8 and cfg.bcast_prefetch is True and cfg.bucket_mb == 4
    both = SyncConfig(torch={"chunk_mb": 8}, bcast_chunk_mb=16)
    assert both.torch.chunk_mb == 16
    with pytest.raises(TypeError, match="nope"):
        SyncConfig(nope=1)
    with pytest.raises(TypeError, match="TorchConfig"):
        SyncConfig(torch=3)


def test_copies_keep_and_change_settings():
    cfg = SyncConfig(timeout_s=5, handle_token="k")
    changed = cfg.replace(handle_token="k2", delta="off")
    assert (changed.handle_token, changed.delta, changed.timeout_s) == ("k2", "off", 5)
    assert cfg.handle_token == "k"  # the original is untouched
    assert dataclasses.replace(cfg, ucx={"retries": 7}).ucx_retries == 7
    assert pickle.loads(pickle.dumps(cfg)) == cfg == copy.deepcopy(cfg)
    assert SyncConfig(**cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.timeout_s = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="bucket_mb"):
        cfg.replace(bucket_mb=0)  # copies are validated again


def test_millisecond_names_convert_to_second_fields():
    cfg = SyncConfig(coord_lease_ms=1500, ucx_retry_delay_ms=250, ipc_target_bucket_ms=100)
    assert cfg.control.lease_s == 1.5 and cfg.ucx.retry_delay_s == 0.25 and cfg.window.target_bucket_s == 0.1
    assert (cfg.coord_lease_ms, cfg.ucx_retry_delay_ms, cfg.ipc_target_bucket_ms) == (1500, 250, 100)
    assert isinstance(cfg.coord_lease_ms, int) and isinstance(cfg.ipc_target_bucket_ms, float)
    env = SyncConfig.from_env({"HOTWEIGHTS_COORD_LEASE_MS": "2500", "HOTWEIGHTS_IPC_TARGET_BUCKET_MS": "50"})
    assert env.control.lease_s == 2.5 and env.window.target_bucket_s == 0.05
    assert SyncConfig(control=ControlConfig(lease_s=0.75)).coord_lease_ms == 750


# ---------------------------------------------------------------- environment
def test_defaults_and_env_parsing():
    cfg = SyncConfig.from_env({"HOTWEIGHTS_BUCKET_MB": "8", "HOTWEIGHTS_IPC_ADAPT": "yes",
                               "HOTWEIGHTS_SEND_DTYPE": "bfloat16", "HOTWEIGHTS_TRANSPORT": "shm",
                               "HOTWEIGHTS_KV_HEAD_MAP": "", "HOTWEIGHTS_BCAST_CHUNK_MB": "48"})
    assert cfg.bucket_mb == 8 and cfg.ipc_adapt is True and cfg.transport == "shm"
    assert cfg.send_dtype == "bfloat16" and cfg.kv_head_map is None and cfg.torch.chunk_mb == 48
    assert SyncConfig().ipc_inflight_buckets == 4 and SyncConfig().ipc_target_bucket_ms == 250
    assert SyncConfig().bcast_chunk_mb == 32 and SyncConfig().ipc_copy_chunk_mb == 16


def test_env_fallback_and_overrides():
    assert SyncConfig.from_env({"NCCL_IB_HCA": "mlx5_0"}).ucx.net_devices == "mlx5_0"
    own = {"NCCL_IB_HCA": "mlx5_0", "HOTWEIGHTS_UCX_NET_DEVICES": "mlx5_1"}
    assert SyncConfig.from_env(own).ucx_net_devices == "mlx5_1"
    env = {"HOTWEIGHTS_TIMEOUT_S": "9", "HOTWEIGHTS_BUCKET_MB": "2"}
    assert SyncConfig.from_env(env, timeout_s=3).timeout_s == 3
    # A section object is complete: it replaces all the environment said of that section; a dict
    # replaces only the fields it names.
    cfg = SyncConfig.from_env(env, core=CoreConfig(bucket_mb=16))
    assert cfg.bucket_mb == 16 and cfg.timeout_s == 60
    cfg = SyncConfig.from_env(env, core={"bucket_mb": 16})
    assert cfg.bucket_mb == 16 and cfg.timeout_s == 9


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as info:
        SyncConfig.from_env({"HOTWEIGHTS_BUCKET_MB": "lots", "HOTWEIGHTS_TIMEOUT_S": "-1",
                             "HOTWEIGHTS_ON_ERROR": "ignore", "HOTWEIGHTS_OPT_ATTENUATION": "2",
                             "HOTWEIGHTS_IPC_MIN_INFLIGHT": "0", "HOTWEIGHTS_COORD_LEASE_MS": "0"})
    probs = info.value.problems
    assert len(probs) == 6
    text = str(info.value)
    for name in ("HOTWEIGHTS_BUCKET_MB", "HOTWEIGHTS_TIMEOUT_S", "HOTWEIGHTS_ON_ERROR",
                 "HOTWEIGHTS_OPT_ATTENUATION", "HOTWEIGHTS_IPC_MIN_INFLIGHT", "HOTWEIGHTS_COORD_LEASE_MS"):
        assert name in text
    # Each problem names the section field too, so it can be found from code or from the shell.
    for path in ("core.bucket_mb", "core.timeout_s", "optim.attenuation", "window.min_inflight",
                 "control.lease_s"):
        assert path in text


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="bucket_mb"):
        SyncConfig(bucket_mb=0)
    with pytest.raises(ConfigError, match="send_dtype"):
        SyncConfig(send_dtype="int8")
    with pytest.raises(ConfigError, match="ipc_min_inflight"):
        SyncConfig(ipc_min_inflight=8, ipc_max_inflight=2)
    with pytest.raises(ConfigError, match="coord_endpoint"):
        SyncConfig(coord_backend="tcp")
    with pytest.raises(ConfigError, match="bcast_autotune_chunks_mb"):
        SyncConfig(bcast_autotune_chunks_mb="8,x")
    with pytest.raises(ConfigError) as info:  # a section alone validates the same way
        WindowConfig(inflight_buckets=0, max_inflight=0)
    assert len(info.value.problems) == 2


def test_unknown_variable_is_warned(caplog):
    SyncConfig.from_env({"HOTWEIGHTS_BUCKETMB": "8"})
    assert "HOTWEIGHTS_BUCKETMB" in caplog.text


# ---------------------------------------------------------------- declared metadata
def test_every_setting_is_documented_and_named_once():
    assert set(field_docs()) == {s.flat for s in SETTINGS}
    for cls in SECTIONS:
        assert set(section_field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
        assert cls.__doc__ and cls.KEY in {f.name for f in dataclasses.fields(SyncConfig)}
    assert len({s.flat for s in SETTINGS}) == len(SETTINGS)
    assert {f.name for f in dataclasses.fields(SyncConfig)} == {cls.KEY for cls in SECTIONS}


def test_bounds_are_declared_on_the_fields_and_enforced():
    # Every numeric setting without a declared bound would accept nonsense: each one has a bound, and
    # a value just past it is refused with the setting's variable in the message.
    checked = 0
    for s in SETTINGS:
        inner, _ = unwrap_optional(s.type)
        if inner not in (int, float) or typing.get_origin(inner) is typing.Literal:
            continue
        meta = s.field.metadata
        assert {"min", "gt", "max"} & set(meta), f"{s.path} declares no bound"
        bad = meta["gt"] if "gt" in meta else meta["min"] - 1 if "min" in meta else meta["max"] + 1
        with pytest.raises(ConfigError) as info:
            SyncConfig(**{s.section.KEY: {s.name: inner(bad)}})
        assert s.env in str(info.value) and s.path in str(info.value)
        checked += 1
    assert checked >= 30


def test_units_are_one_per_kind():
    for s in SETTINGS:
        unit = s.field.metadata.get("unit", "")
        if unit == "s":
            assert s.name.endswith("_s"), s.path
        if unit.startswith("MiB"):
            assert s.name.endswith("_mb"), s.path
        if s.name.endswith("_ms"):
            pytest.fail(f"{s.path}: section fields hold seconds; milliseconds stay on the flat name only")
    assert {s.flat for s in SETTINGS if s.scale is not None} == {
        "ipc_target_bucket_ms", "ucx_retry_delay_ms", "coord_lease_ms"}


def test_transport_specific_settings_say_which_transports():
    for cls in SECTIONS:
        if cls.KEY in TRANSPORTS:  # a section of one transport: each field says it is that one's
            own = [s for s in SETTINGS if s.section is cls and s.name != "use_gds"]
            assert own and all(s.used_by == (cls.KEY,) for s in own), cls
    window = {s.flat: s.used_by for s in SETTINGS if s.section is WindowConfig}
    assert all(set(u) == set(WINDOWED) for u in window.values()) and set(WINDOWED) <= TRANSPORTS
    assert all(set(s.used_by) <= TRANSPORTS for s in SETTINGS if s.section.KEY in ("delta_sync", "gpu")
               and s.name != "use_gds")
