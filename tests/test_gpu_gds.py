"""Checkpoint shards as a publish source: GDS when available, else CPU assembly plus H2D (logged)."""

from __future__ import annotations

import json
import logging
import struct
import uuid

import pytest
import torch

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver, WireFormatError
from hotweights_trainer.gpu.gds import CheckpointReader, gds_unavailable_reason, read_header
from hotweights_trainer.verify import weights_digest

safetensors_torch = pytest.importorskip("safetensors.torch")


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(300, 64, generator=g).bfloat16(), "ln.bias": torch.randn(64, generator=g),
            "head.weight": torch.randn(64, 10, generator=g).half(), "ids": torch.arange(7, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3)}


def test_reader_falls_back_to_host_and_says_why(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hotweights_trainer.gpu.gds")
    a, b = _tensors(1), {"extra.w": torch.randn(5, 5)}
    safetensors_torch.save_file(a, str(tmp_path / "model-00001.safetensors"))
    safetensors_torch.save_file(b, str(tmp_path / "model-00002.safetensors"))
    reader = CheckpointReader(tmp_path, device="cpu", use_gds=True)
    assert reader.mode == "host" and "not a CUDA device" in reader.reason
    got = dict(reader)
    assert weights_digest(got) == weights_digest({**a, **b})
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in {**a, **b}.values())
    assert any("CPU assembly plus host-to-device" in r.getMessage() for r in caplog.records)
    assert CheckpointReader(tmp_path, device="cpu", config=SyncConfig()).reason == "HOTWEIGHTS_USE_GDS is off"


def test_gds_reasons_are_specific():
    assert gds_unavailable_reason(torch.device("cpu"), False) == "HOTWEIGHTS_USE_GDS is off"
    if not torch.cuda.is_available():
        assert "no CUDA device" in gds_unavailable_reason(torch.device("cuda"), True)


def _write_raw(path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize("header,data,match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "bytes for shape"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
    ({"w": [1, 2]}, b"", "not an object"),
])
def test_malformed_headers_are_rejected(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(WireFormatError, match=match):
        read_header(path)


def test_truncated_and_non_json_files_are_rejected(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(WireFormatError, match="too short"):
        read_header(tmp_path / "short.safetensors")
    (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(WireFormatError, match="does not fit"):
        read_header(tmp_path / "big.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x]")
    with pytest.raises(WireFormatError, match="not JSON"):
        read_header(tmp_path / "junk.safetensors")
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(WireFormatError, match="no .safetensors"):
        CheckpointReader(empty, device="cpu")


def test_publish_a_checkpoint_to_a_receiver(tmp_path):
    tensors = _tensors(2)
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    model = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        mod = model
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, torch.zeros_like(t))
    endpoint = f"shm://gds-{uuid.uuid4().hex[:8]}"
    cfg = SyncConfig(timeout_s=20, bucket_mb=1)
    with WeightPublisher(endpoint, config=cfg) as pub, WeightReceiver(endpoint, model=model, config=cfg) as rx:
        pub.wait_for_receivers(1)
        pub.publish(CheckpointReader(tmp_path / "model.safetensors", device="cpu", config=cfg))
        rx.wait_for_version(1)
    assert weights_digest(model) == weights_digest(tensors)
