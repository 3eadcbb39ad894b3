"""The transport conformance cases under a real ``mpirun``: rank 0 publishes, the other ranks receive.

``--case all`` (4 ranks): round trip and several receivers (ranks 1-2), a late joiner (rank 3
creates its receiver only after two versions), a corrupted bucket, and the in-flight byte cap.
``--case kill`` (3 ranks): rank 2 SIGKILLs itself mid-version. Every rank prints JSON lines; the test
compares them after the job ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from mpi4py import MPI

from hotweights_trainer import CorruptBucketError, HotweightsError, SyncConfig, WeightPublisher, WeightReceiver
from hotweights_trainer.verify import weights_digest
from tests.procs.common import SpecModule, make_tensors, mixed_spec

SPEC = mixed_spec(n_small=12, big_elems=400_000)
CAP = int(2.5 * ((1 << 20) + 4096))


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def config() -> SyncConfig:
    return SyncConfig(transport="mpi", bucket_mb=1, timeout_s=20, mpi_chunk_mb=1, mpi_window=4,
                      ipc_inflight_bytes=CAP)


def publisher(case: str) -> None:
    world = MPI.COMM_WORLD
    with WeightPublisher("mpi://", config=config()) as pub:
        emit(rank=0, capabilities=pub.transport.describe())
        pub.wait_for_receivers(2)
        for v in (1, 2):
            tensors = make_tensors(SPEC, v)
            res = pub.publish(tensors)
            emit(pub=v, digests=weights_digest(tensors), receivers=res.receivers, buckets=res.buckets)
        if case == "kill":
            pub.publish(make_tensors(SPEC, 3))  # the job ends during this (rank 2 died in version 2)
            return
        world.Barrier()  # B1: rank 3 starts its receiver now
        pub.wait_for_receivers(3)
        world.Barrier()  # B2: rank 3 has caught up on version 2
        v3 = make_tensors(SPEC, 3)
        emit(pub=3, digests=weights_digest(v3), receivers=pub.publish(v3).receivers)
        post = pub.transport.post

        def corrupting_post(to, version, index, buf):
            if version == 4 and index == 1:
                buf.mem[buf.length - 3] ^= 0x5A
            post(to, version, index, buf)

        pub.transport.post = corrupting_post
        try:
            pub.publish(make_tensors(SPEC, 4))
            emit(corrupt="not detected")
        except CorruptBucketError as exc:
            emit(corrupt=type(exc).__name__, message=str(exc)[:200])
        pub.transport.post = post
        v5 = make_tensors(SPEC, 5)
        emit(pub=5, digests=weights_digest(v5), receivers=pub.publish(v5).receivers)
        s = pub.transport.stats()
        emit(stats={"bytes_high": s.inflight_bytes_high, "buckets_high": s.inflight_buckets_high,
                    "buckets_posted": s.buckets_posted, "inflight_bytes": s.inflight_bytes}, cap=CAP, window=4)
        world.Barrier()  # B3


def receiver(case: str) -> None:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    late = case == "all" and rank == 3
    if late:
        world.Barrier()  # B1
    model = SpecModule(SPEC)
    with WeightReceiver("mpi://", model=model, config=config()) as rx:
        if case == "kill" and rank == 2:
            deliver = rx.on_bucket

            def on_bucket(version, index, data):
                if (version, index) == (2, 2):
                    emit(rank=rank, dying=[version, index])
                    os.kill(os.getpid(), signal.SIGKILL)
                deliver(version, index, data)

            rx.on_bucket = on_bucket
        want = 2 if late else 1
        last = 3 if case == "kill" else 5
        while rx.version < last:
            try:
                v = rx.wait_for_version(want)
            except HotweightsError as exc:
                emit(rank=rank, error=type(exc).__name__, version=rx.version)
                continue
            emit(rank=rank, version=v, digests=weights_digest(model))
            want = v + 1
            if case == "all" and v == 2:
                if not late:
                    world.Barrier()  # B1
                world.Barrier()  # B2
        if case == "all":
            world.Barrier()  # B3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["all", "kill"], required=True)
    args = ap.parse_args()
    if MPI.COMM_WORLD.Get_rank() == 0:
        publisher(args.case)
    else:
        receiver(args.case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
