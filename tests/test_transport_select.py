"""Auto-selection (pure decisions, logged inputs), torch backend choice, UCX options, contract docs."""

from __future__ import annotations

import logging

import pytest

from hotweights_trainer import ConfigError, SyncConfig, TransportUnavailableError
from hotweights_trainer.config import launcher_facts
from hotweights_trainer.transports import REGISTRY, SCHEMES, parse_endpoint, publisher_class, resolve
from hotweights_trainer.transports.base import CAPABILITIES, capabilities
from hotweights_trainer.transports.select import Inputs, decide, is_loopback
from hotweights_trainer.transports.torch_backends import pick_backend
from hotweights_trainer.transports.ucx_backends import ucx_options


def _inputs(**kw) -> Inputs:
    base = dict(endpoint_scheme="tcp", role="publisher", loopback=False, mpi_launcher=None, ucx_module=None,
                cuda_available=False, cuda_ipc_in_build=False)
    base.update(kw)
    return Inputs(**base)


@pytest.mark.parametrize("inputs,expected", [
    (_inputs(endpoint_scheme="shm"), "shm"),
    (_inputs(endpoint_scheme="shm", cuda_available=True, cuda_ipc_in_build=True), "cuda_ipc"),
    (_inputs(endpoint_scheme="shm", cuda_available=True), "shm"),  # cuda_ipc not in this build
    (_inputs(loopback=True, ucx_module="ucxx"), "shm"),  # same host wins over UCX
    (_inputs(endpoint_scheme="mpi", mpi_launcher="OMPI_COMM_WORLD_SIZE=4"), "mpi"),
    (_inputs(endpoint_scheme="mpi"), "mpi"),
    (_inputs(ucx_module="ucxx"), "ucx"),
    (_inputs(ucx_module="ucp"), "ucx"),
    (_inputs(), "torch"),
])
def test_decide(inputs, expected):
    choice, reason = decide(inputs)
    assert choice == expected and reason


def test_auto_logs_every_input_and_maps_loopback_to_shm(caplog):
    caplog.set_level(logging.INFO, logger="hotweights_trainer.transports.select")
    cfg = SyncConfig()
    assert resolve(parse_endpoint("tcp://127.0.0.1:5999"), cfg, role="receiver") == "shm"
    msg = caplog.records[-1].getMessage()
    for key in ("endpoint_scheme=tcp", "role=receiver", "loopback=True", "mpi_launcher=", "ucx_module=",
                "cuda_available=", "cuda_ipc_in_build=", "-> shm"):
        assert key in msg
    assert resolve(parse_endpoint("mpi://"), cfg, role="publisher") == "mpi"


def test_explicit_transport_must_fit_the_endpoint():
    with pytest.raises(ConfigError, match="tcp://"):
        resolve(parse_endpoint("shm://x"), SyncConfig(transport="torch"), role="publisher")
    with pytest.raises(ConfigError, match="mpi://"):
        resolve(parse_endpoint("tcp://h:1"), SyncConfig(transport="mpi"), role="publisher")
    assert resolve(parse_endpoint("shm://x"), SyncConfig(transport="cuda_ipc"), role="publisher") == "cuda_ipc"
    with pytest.raises(ConfigError, match="shm://"):
        resolve(parse_endpoint("tcp://h:1"), SyncConfig(transport="cuda_ipc"), role="publisher")


def test_cuda_ipc_without_a_device_says_so():
    import torch

    from hotweights_trainer.transports import create_publisher_transport, create_receiver_transport

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = SyncConfig(transport="cuda_ipc")
    for create in (create_publisher_transport, create_receiver_transport):
        with pytest.raises(TransportUnavailableError, match="needs a CUDA device"):
            create(parse_endpoint("shm://x"), cfg)


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.1.2.3") and not is_loopback(None)


def test_launcher_facts_read_mpi_variables():
    assert launcher_facts({"OMPI_COMM_WORLD_SIZE": "4"}) == {"mpi_launcher": "OMPI_COMM_WORLD_SIZE=4"}
    assert launcher_facts({"PMI_SIZE": "2"})["mpi_launcher"] == "PMI_SIZE=2"
    assert launcher_facts({}) == {"mpi_launcher": None}


def test_every_registered_transport_declares_its_capabilities():
    assert set(REGISTRY) == set(SCHEMES) >= {"shm", "torch", "mpi", "ucx"}
    for name in ("shm", "torch", "mpi", "ucx"):
        cls = publisher_class(name)
        caps = capabilities(cls)
        assert set(CAPABILITIES) <= set(caps)
        for cap in CAPABILITIES:
            if not caps[cap]:
                assert caps["limits"].get(cap), f"{name} lacks {cap} without saying why"
    assert capabilities(publisher_class("shm"))["zero_copy"] and not capabilities(publisher_class("shm"))["cross_host"]
    for name in ("torch", "mpi", "ucx"):
        assert capabilities(publisher_class(name))["cross_host"]


@pytest.mark.parametrize("requested,local,members,expected,why", [
    ("auto", ["gloo"], {"a": ["gloo"]}, "gloo", ""),
    ("auto", ["nccl", "gloo"], {"a": ["nccl", "gloo"], "b": ["nccl", "gloo"]}, "nccl", ""),
    ("auto", ["nccl", "gloo"], {"a": ["nccl", "gloo"], "b": ["gloo"]}, "gloo", "not usable on receiver(s) b"),
    ("nccl", ["gloo"], {"a": ["nccl", "gloo"]}, "gloo", "not usable on the publisher"),
    ("ccl", ["ccl", "gloo"], {"a": ["ccl", "gloo"]}, "ccl", ""),
    ("gloo", ["nccl", "gloo"], {"a": ["nccl", "gloo"]}, "gloo", ""),
])
def test_pick_backend_falls_back_to_gloo_and_says_why(requested, local, members, expected, why):
    backend, reason = pick_backend(requested, local, members)
    assert backend == expected
    assert (why in reason) if why else reason == ""


def test_pick_backend_without_gloo_is_a_typed_error():
    with pytest.raises(TransportUnavailableError, match="receiver"):
        pick_backend("auto", ["gloo"], {"a": ["nccl"]})


def test_ucx_options_and_net_devices_fallback():
    cfg = SyncConfig.from_env({"NCCL_IB_HCA": "mlx5_0:1", "HOTWEIGHTS_UCX_OPTIONS": "UCX_TLS=tcp, RNDV_THRESH=8k"})
    assert ucx_options(cfg) == {"TLS": "tcp", "RNDV_THRESH": "8k", "NET_DEVICES": "mlx5_0:1"}
    cfg = SyncConfig.from_env({"NCCL_IB_HCA": "mlx5_0:1", "HOTWEIGHTS_UCX_NET_DEVICES": "eth0"})
    assert ucx_options(cfg)["NET_DEVICES"] == "eth0"
    assert ucx_options(SyncConfig()) == {"TCP_TX_SEG_SIZE": "1m", "TCP_RX_SEG_SIZE": "1m"}
