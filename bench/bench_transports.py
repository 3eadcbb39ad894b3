"""Transport throughput against the raw library moving the same bytes, and against memcpy.

    python bench/bench_transports.py                 # 256 MiB and 1 GiB, every transport available
    python bench/bench_transports.py --sizes-mb 64 --transports torch --reps 2

For each size, in one run, two processes on this host (publisher + one receiver):

- ``memcpy``: numpy copy of the same bytes into a pre-faulted buffer (the physical limit here);
- raw libraries: ``MPI.Bcast`` of one numpy buffer (mpirun -n 2), ``dist.broadcast`` of one flat
  tensor (gloo), ``ucx_perftest -t tag_bw`` where it is installed, and ucxx tag-send of one buffer
  with the transport's UCX options;
- ``transport``: the transport alone, through its contract -- pre-packed buckets posted by the
  publisher transport, delivered in order to the receiver engine callbacks, which answers
  ``staged`` when the last one arrived (control plane, chunking, window, buffer pools included);
- ``publish``: ``WeightPublisher.publish`` end to end, dense (packing, xxh3 checksums on both
  sides, manifest checks, two-phase commit) -- what a trainer sees.

Every number is the best of ``--reps`` timed runs after one warm-up; GB/s is 10^9 bytes/s. The
machine is shared and noisy: compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


# ---------------------------------------------------------------- workers (run in child processes)
def _buckets(size: int, bucket: int, pool_alloc):
    """Pre-packed bucket buffers covering ``size`` bytes (contents: a repeating pattern)."""
    out = []
    for off in range(0, size, bucket):
        n = min(bucket, size - off)
        buf = pool_alloc(n)
        buf.length = n
        mv = buf.mem
        mv[:n] = bytes([off // bucket % 251]) * n
        out.append(buf)
    return out


class _PubHandler:
    def __init__(self):
        self.joined = threading.Event()
        self.rid = None
        self.staged: dict[int, threading.Event] = {}
        self.lock = threading.Lock()

    def event(self, v):
        with self.lock:
            return self.staged.setdefault(v, threading.Event())

    def on_join(self, rid, hello):
        self.rid = rid
        self.tx.send([rid], {"op": "welcome", "session": 1, "pid": os.getpid(), "version": 0})
        self.joined.set()

    def on_message(self, rid, msg):
        if msg["op"] == "staged":
            self.event(msg["version"]).set()

    def on_lost(self, rid, reason):
        pass

    def on_tick(self):
        pass


class _RxHandler:
    def __init__(self, n_buckets: int):
        self.n = n_buckets
        self.count: dict[int, int] = {}
        self.tx = None

    def on_connected(self, info):
        pass

    def on_message(self, msg):
        pass

    def on_bucket(self, version, index, data):
        c = self.count.get(version, 0) + 1
        self.count[version] = c
        if c == self.n:
            self.tx.send({"op": "staged", "version": version})
            self.tx.send({"op": "release", "version": version})

    def on_bucket_failed(self, version, index, error):
        print(f"bucket {index} of {version} failed: {error}", file=sys.stderr, flush=True)

    def on_lost(self, reason):
        pass


def _hello():
    return {"op": "hello", "receiver_id": f"bench-{os.getpid()}", "pid": os.getpid(), "live_version": 0}


class _Raw:
    """The raw library moving one buffer of ``size`` bytes from this pair's rank 0 to rank 1."""

    def __init__(self, transport: str, rank: int, port: int, size: int, cfg):
        import numpy as np

        self.kind, self.rank, self.size = transport, rank, size
        self.buf = np.ones(size, np.uint8) if rank == 0 else np.zeros(size, np.uint8)
        if transport == "mpi":
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.what = "MPI.Bcast"
        elif transport == "torch":
            import datetime

            import torch
            import torch.distributed as dist

            # The trainer's own default process group; the transport's groups live beside it.
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                    timeout=datetime.timedelta(seconds=300))
            self.dist = dist
            self.tensor = torch.from_numpy(self.buf)
            self.what = "dist.broadcast"
        else:
            from hotweights_trainer.transports.ucx_backends import CoreBackend, ucx_options

            self.be = CoreBackend(ucx_options(cfg))
            self.ack = np.zeros(1, np.uint8)
            self.what = "ucxx tag_send"
            if rank == 1:
                got = []
                self.be._listener = self.be._api.UCXListener.create(
                    worker=self.be._worker, port=port,
                    cb_func=lambda req: got.append(self.be._listener.create_endpoint_from_conn_request(req, True)))
                self.ep = None
            else:
                time.sleep(1.0)
                self.ep = self.be.connect("127.0.0.1", port, 30)
            self.seq = 0

    def _wait(self, req) -> None:
        while not self.be.done(req):
            time.sleep(5e-5)
        err = self.be.error(req)
        if err is not None:
            raise err

    def once(self) -> float:
        """One timed transfer (both ranks call it; rank 0's number is the one reported)."""
        if self.kind == "mpi":
            self.comm.Barrier()
            t0 = time.perf_counter()
            self.comm.Bcast(self.buf, root=0)
            self.comm.Barrier()
        elif self.kind == "torch":
            self.dist.barrier()
            t0 = time.perf_counter()
            self.dist.broadcast(self.tensor, src=0)
            self.dist.barrier()
        else:
            self.seq += 1
            base = 1_000_000 * self.seq
            if self.rank == 1:
                r = self.be.recv(self.buf, base + 1)
                self._wait(self.be.recv(self.ack, base + 2))  # "go" from rank 0 ...
                t0 = time.perf_counter()
                self._wait(r)
                # ... and "done" back (rank 1 has no endpoint of its own; rank 0 receives on its worker)
                self.done_tag = base + 3
            else:
                self._wait(self.be.send(self.ep, self.ack, base + 2))
                t0 = time.perf_counter()
                self._wait(self.be.send(self.ep, self.buf, base + 1))
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.kind == "torch":
            self.dist.destroy_process_group()
        elif self.kind == "ucx":
            time.sleep(0.2)
            self.be.close()


def worker_pair(role: str, transport: str, endpoint: str, size: int, reps: int, cfg_json: str, raw_port: int) -> None:
    """Raw library and transport interleaved rep by rep (same load for both), then publish() end to end."""
    from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver
    from hotweights_trainer.transports import create_publisher_transport, create_receiver_transport, parse_endpoint

    # delta off: the same weights are published every rep, and a delta of nothing measures nothing.
    cfg = SyncConfig(transport=transport, timeout_s=300, delta="off", **json.loads(cfg_json))
    ep = parse_endpoint(endpoint)
    n_buckets = -(-size // cfg.bucket_bytes)
    rank = 0 if role == "pub" else 1
    raw = _Raw(transport, rank, raw_port, size, cfg)
    raw_times, tx_times = [], []
    if role == "pub":
        tx = create_publisher_transport(ep, cfg)
        h = _PubHandler()
        h.tx = tx
        tx.start(h)
        assert h.joined.wait(300), "receiver did not join"
        bufs = _buckets(size, cfg.bucket_bytes, tx.alloc)
        for v in range(1, reps + 2):
            raw_times.append(raw.once())
            t0 = time.perf_counter()
            for i, b in enumerate(bufs):
                tx.post([h.rid], v, i, b)
            assert h.event(v).wait(300), f"version {v} not staged"
            tx_times.append(time.perf_counter() - t0)
        stats = tx.stats()
        tx.close()
        _emit(kind="raw", transport=transport, what=raw.what, size=size, seconds=min(raw_times[1:]))
        _emit(kind="transport", transport=transport, size=size, seconds=min(tx_times[1:]),
              inflight_buckets_high=stats.inflight_buckets_high)
    else:
        rx = create_receiver_transport(ep, cfg)
        h = _RxHandler(n_buckets)
        h.tx = rx
        rx.start(h, _hello)
        for v in range(1, reps + 2):
            raw.once()
            deadline = time.monotonic() + 300
            while h.count.get(v, 0) < n_buckets and time.monotonic() < deadline:
                time.sleep(0.001)
        time.sleep(0.5)
        rx.close()
    raw.close()
    import torch

    if role == "pub":
        time.sleep(2.0)  # the receiver's bare transport must be gone, or it would reconnect to this publisher
        weights = {f"w{i}": torch.full((cfg.bucket_bytes // 4,), float(i)) for i in range(n_buckets)}
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(1, timeout=300)
            results = [pub.publish(weights) for _ in range(reps + 1)]
        best = min(results[1:], key=lambda r: r.seconds)
        _emit(kind="publish", transport=transport, size=size, seconds=best.seconds,
              phases={k: round(v, 4) for k, v in best.phases.items()})
    else:
        with WeightReceiver(endpoint, apply=lambda items: sum(1 for _ in items), config=cfg) as r:
            while r.version < reps + 1:
                r.wait_for_version(r.version + 1, timeout=300)


# ---------------------------------------------------------------- orchestration
def _run_pair(cmds: list[list[str]], env: dict, timeout: float) -> list[dict]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for c in cmds]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"benchmark worker timed out: {' '.join(p.args)}") from None
        if p.returncode != 0:
            raise RuntimeError(f"benchmark worker failed ({p.returncode}): {' '.join(p.args)}\n{err[-3000:]}")
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return results


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    return env


def memcpy_seconds(size: int, reps: int) -> float:
    import numpy as np

    src = np.ones(size, np.uint8)
    dst = np.zeros(size, np.uint8)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def ucx_perftest_seconds(size: int, reps: int, env: dict) -> dict[str, float]:
    """ucx_perftest tag_bw over TCP, with UCX defaults and with the transport's options."""
    exe = shutil.which("ucx_perftest")
    if exe is None:
        return {}
    out = {}
    variants = {"ucx_perftest": {}, "ucx_perftest (1m seg)": {"UCX_TCP_TX_SEG_SIZE": "1m", "UCX_TCP_RX_SEG_SIZE": "1m"}}
    for name, extra in variants.items():
        e = dict(env, UCX_TLS="tcp", **extra)
        port = str(_free_port())
        iters = str(max(5 * reps, 16))  # perftest is noisy over few iterations
        server = subprocess.Popen([exe, "-t", "tag_bw", "-s", str(size), "-n", iters, "-w", "3", "-p", port],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
        time.sleep(1.0)
        client = subprocess.run([exe, "127.0.0.1", "-t", "tag_bw", "-s", str(size), "-n", iters, "-w", "3",
                                 "-p", port],
                                capture_output=True, text=True, env=e, timeout=300)
        server.wait(60)
        final = [line for line in client.stdout.splitlines() if line.startswith("Final:")]
        if final:
            mib_s = float(final[0].split()[5])  # "bandwidth (MB/s) average", UCX's MB is 2^20
            out[name] = size / (mib_s * MB)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="256,1024")
    ap.add_argument("--transports", default="mpi,torch,ucx")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-sized run (8 MiB, one rep, transports available here); its numbers mean nothing")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sizes_mb, args.reps, args.bucket_mb = "8", 1, 4
        args.transports = ",".join(t for t in args.transports.split(",") if _available(t))
    if args.worker:
        role, transport, endpoint, size, reps, cfg_json, raw_port = args.worker
        worker_pair(role, transport, endpoint, int(size), int(reps), cfg_json, int(raw_port))
        return 0

    env = _env()
    py = sys.executable
    me = str(Path(__file__).resolve())
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    cfgs = {"mpi": {"bucket_mb": args.bucket_mb, "mpi_chunk_mb": 16, "mpi_window": 4},
            "torch": {"bucket_mb": args.bucket_mb, "bcast_chunk_mb": 32, "bcast_prefetch": True},
            "ucx": {"bucket_mb": args.bucket_mb, "ucx_chunk_mb": args.bucket_mb}}
    same_run = {"mpi": "MPI.Bcast", "torch": "dist.broadcast", "ucx": "ucxx tag_send"}
    rows = []
    for size_mb in [int(s) for s in args.sizes_mb.split(",")]:
        size = size_mb * MB
        mem = memcpy_seconds(size, args.reps)
        for t in transports:
            if t not in cfgs:
                raise SystemExit(f"unknown transport {t!r}")
            cfg_json = json.dumps(cfgs[t])
            raw_port = _free_port()
            endpoint = "mpi://" if t == "mpi" else f"tcp://127.0.0.1:{_free_port()}"

            def worker(role: str) -> list[str]:
                return [py, me, "--worker", role, t, endpoint, str(size), str(args.reps), cfg_json, str(raw_port)]

            if t == "mpi":  # one mpirun, two app contexts: rank 0 publishes, rank 1 receives
                mpirun = [shutil.which("mpirun") or "mpirun", "--oversubscribe"]
                res = _run_pair([mpirun + ["-n", "1", *worker("pub"), ":", "-n", "1", *worker("rx")]], env, 1800)
            else:
                res = _run_pair([worker("pub"), worker("rx")], env, 1800)
            raws = {r["what"]: r["seconds"] for r in res if r["kind"] == "raw"}
            if t == "ucx":
                raws.update(ucx_perftest_seconds(size, args.reps, env))
            tx = next(r for r in res if r["kind"] == "transport")
            pub = next(r for r in res if r["kind"] == "publish")
            rows.append({"size_mb": size_mb, "transport": t, "memcpy_gbps": size / mem / 1e9,
                         "raw": {k: size / v / 1e9 for k, v in raws.items()}, "raw_same_run": same_run[t],
                         "raw_gbps": size / raws[same_run[t]] / 1e9, "transport_gbps": size / tx["seconds"] / 1e9,
                         "publish_gbps": size / pub["seconds"] / 1e9, "publish_phases": pub.get("phases"),
                         "inflight_buckets_high": tx.get("inflight_buckets_high")})
            print(f"... {t} {size_mb} MiB done", file=sys.stderr, flush=True)
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _available(transport: str) -> bool:
    import importlib.util

    if transport == "mpi":
        return importlib.util.find_spec("mpi4py") is not None and shutil.which("mpirun") is not None
    if transport == "ucx":
        return importlib.util.find_spec("ucxx") is not None or importlib.util.find_spec("ucp") is not None
    return True


def _print_table(rows: list[dict]) -> None:
    print()
    print("| transport | size | memcpy GB/s | raw library GB/s | transport GB/s | transport / raw "
          "| publish() GB/s | publish / raw | transport / memcpy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        raw_desc = ", ".join(f"{k} {v:.2f}" for k, v in r["raw"].items())
        print(f"| {r['transport']} | {r['size_mb']} MiB | {r['memcpy_gbps']:.2f} | {raw_desc} "
              f"| {r['transport_gbps']:.2f} | {r['transport_gbps'] / r['raw_gbps']:.0%} "
              f"| {r['publish_gbps']:.2f} | {r['publish_gbps'] / r['raw_gbps']:.0%} "
              f"| {r['transport_gbps'] / r['memcpy_gbps']:.0%} |")
    print("\nratios are against the raw library measured in the same two processes, interleaved rep by rep "
          "(MPI.Bcast, dist.broadcast, ucxx tag_send); ucx_perftest runs separately, on the system's UCX build.")


if __name__ == "__main__":
    sys.exit(main())
