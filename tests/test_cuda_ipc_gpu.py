"""The GPU data path on a real CUDA device: run by ``pytest -m gpu`` (scripts/gpu_check.sh).

Every test here is marked ``gpu`` and skips cleanly where no CUDA device exists;
tests/test_gpu_logic.py checks that skip, and runs the device-independent logic on CPU.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from hotweights_trainer import SyncConfig, WeightPublisher
from hotweights_trainer.gpu import autotune
from hotweights_trainer.gpu.checksum import DigestAccumulator, payload_digest
from hotweights_trainer.gpu.scatter import DeviceScatter
from hotweights_trainer.gpu.topology import probe
from hotweights_trainer.verify import weights_digest
from tests.conftest import run_python
from tests.procs.common import make_tensors, mixed_spec
from tests.procs.spawn import Proc, write_spec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TIMEOUT = 60.0


def test_device_digest_equals_the_cpu_digest():
    data = torch.randint(0, 256, ((10 << 20) + 64,), dtype=torch.uint8)
    on_gpu = data.cuda()
    assert payload_digest(on_gpu) == payload_digest(data)
    assert payload_digest(on_gpu, chunk_bytes=1 << 20) == payload_digest(data)


def test_scatter_over_streams_on_the_device():
    g = torch.Generator(device="cuda").manual_seed(0)
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)
            for n in (64 << 20, 3 << 20, 4096, 100, 17 << 20)]
    dsts = [torch.zeros_like(s) for s in srcs]
    DeviceScatter(8 << 20, 4).copy(list(zip(dsts, srcs)))
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    acc = DigestAccumulator(srcs[0].numel(), "cuda")
    out = torch.zeros_like(srcs[0])
    DeviceScatter(4 << 20, 3).copy([(out, srcs[0])], digest=acc, sync=False)
    assert acc.value() == payload_digest(srcs[0].cpu()) and torch.equal(out, srcs[0])


def test_topology_and_device_microbenchmark():
    topo = probe(refresh=True)
    assert topo.devices == torch.cuda.device_count() and topo.link(0, 0) == "same"
    rows = autotune.run_micro("cuda", 64 << 20, [4 << 20, 16 << 20], [1, 2], reps=2)
    assert len(rows) == 4 and all(r.gbps > 0 for r in rows)
    autotune.pick_best(rows)


def _receiver(endpoint: str, spec_path: str, until: int, die_at: str | None = None) -> Proc:
    args = ["-m", "tests.procs.gpu_receiver", "--endpoint", endpoint, "--spec", spec_path, "--until", str(until),
            "--timeout", str(TIMEOUT)]
    return Proc(args + (["--die-at", die_at] if die_at else []))


def _line_for(proc: Proc, version: int) -> dict:
    while True:
        line = proc.next(timeout=TIMEOUT + 30)
        if line.get("version") == version:
            return line


def test_cuda_ipc_round_trip_between_two_processes():
    """GPU, CPU and pinned sources -> device buckets -> CUDA IPC -> a receiver's GPU model, bit exact."""
    spec = mixed_spec(n_small=12, big_elems=2_000_000)
    endpoint, spec_path = f"shm://gpu-{uuid.uuid4().hex[:8]}", write_spec(spec)
    rx = _receiver(endpoint, spec_path, until=3)
    try:
        assert rx.next(TIMEOUT)["ready"]
        cfg = SyncConfig(transport="cuda_ipc", bucket_mb=4, timeout_s=TIMEOUT, ipc_inflight_buckets=2,
                         ipc_copy_autotune=True)
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(1, timeout=TIMEOUT)
            for v in (1, 2, 3):
                tensors = make_tensors(spec, 30 + v)
                source = {}
                for i, (name, t) in enumerate(tensors.items()):  # trainers may offload part of the model
                    source[name] = t.cuda() if i % 3 == 0 else t.pin_memory() if i % 3 == 1 else t
                res = pub.publish(source)
                line = _line_for(rx, v)
                assert line["digests"] == weights_digest(tensors)
                assert line["device"] == ["cuda:0"]
            stats = pub.transport.stats()
        assert res.buckets >= 3 and stats.inflight_buckets == 0 and stats.inflight_buckets_high <= 2
    finally:
        rx.kill()


def test_cuda_ipc_survives_a_killed_receiver():
    spec = mixed_spec(n_small=4, big_elems=2_000_000)
    endpoint, spec_path = f"shm://gpu-{uuid.uuid4().hex[:8]}", write_spec(spec)
    dying, alive = _receiver(endpoint, spec_path, until=2, die_at="2:1"), _receiver(endpoint, spec_path, until=2)
    try:
        assert dying.next(TIMEOUT)["ready"] and alive.next(TIMEOUT)["ready"]
        cfg = SyncConfig(transport="cuda_ipc", bucket_mb=2, timeout_s=TIMEOUT)
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(2, timeout=TIMEOUT)
            pub.publish({k: t.cuda() for k, t in make_tensors(spec, 1).items()})
            v2 = make_tensors(spec, 2)
            try:
                pub.publish({k: t.cuda() for k, t in v2.items()})
            except Exception:  # noqa: BLE001 - the version may abort when the receiver dies mid-way
                pub.publish({k: t.cuda() for k, t in v2.items()})
            assert _line_for(alive, 2)["digests"] == weights_digest(v2)
            assert pub.transport.stats().inflight_buckets == 0
    finally:
        dying.kill()
        alive.kill()


def test_checkpoint_reader_onto_the_device(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = make_tensors(mixed_spec(n_small=6, big_elems=100_000), 4)
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "m.safetensors"))
    from hotweights_trainer.gpu.gds import CheckpointReader

    reader = CheckpointReader(tmp_path, device="cuda", use_gds=True)
    got = dict(reader)
    assert all(t.is_cuda for t in got.values()) and weights_digest(got) == weights_digest(tensors)
    assert reader.reason


def test_cuda_ipc_export_opens_in_another_process():
    from hotweights_trainer.gpu.memory import CudaIpcMemory

    mem = CudaIpcMemory()
    buf = mem.alloc(3 << 20)
    buf.copy_(torch.arange(3 << 20, device="cuda", dtype=torch.int64).to(torch.uint8))
    torch.cuda.synchronize()
    export = mem.export(buf)
    code = ("import json,sys,torch; from hotweights_trainer.gpu.memory import CudaIpcMemory; "
            "from hotweights_trainer.gpu.checksum import payload_digest; "
            "t=CudaIpcMemory().open(json.loads(sys.argv[1])); print(payload_digest(t))")
    out = run_python(["-c", code, json.dumps(export)], timeout=TIMEOUT)
    assert int(out.stdout.strip().splitlines()[-1]) == payload_digest(buf)
