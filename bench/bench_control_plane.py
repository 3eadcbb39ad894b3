"""Control-plane overhead per version: last bucket staged -> commit seen by every receiver.

For 1, 4 and 16 receiver processes on this host and each coordinator backend (embedded, redis, tcp),
a tiny model (one 4 KiB tensor) is published repeatedly, so the data path is negligible and what is
measured is the control plane: ``staged`` messages travelling to the publisher, the coordinator's
quorum decision, the commit being recorded and the ``commit`` message reaching every receiver.
Each receiver timestamps (CLOCK_MONOTONIC, shared by all processes of a host) the moment it finished
staging a version and the moment the commit arrived; the overhead of a version is
``max(commit seen) - max(staged)`` over its receivers.

Compared in the same run against:
  * the physical floor: a round trip over a Unix socket between two processes (one message each way);
  * a hand-written two-phase commit: the same N processes, raw length-prefixed JSON over Unix
    sockets, the server waits for N ``staged`` then sends N ``commit`` (no coordinator, no fencing,
    no persistence) -- what people write by hand.

Run: ``python bench/bench_control_plane.py [--versions 40] [--receivers 1,4,16]
[--backends embedded,redis,tcp]``; ``--quick`` is a smoke-sized run (its numbers mean nothing). The redis backend starts a ``redis-server`` on a free port.
Absolute numbers on shared machines are noisy; read medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from hotweights_trainer import SyncConfig, WeightPublisher, WeightReceiver  # noqa: E402

_LEN = struct.Struct("<I")


# ------------------------------------------------------------------------------------------------ hotweights
def receiver_proc(endpoint: str, out: "mp.Queue", stop: "mp.Event") -> None:
    class Timed(WeightReceiver):
        """Timestamps the two control-plane moments without touching the engine's code path."""

        staged: dict[int, float] = {}
        committed: dict[int, float] = {}

        def _send(self, msg):
            if msg["op"] == "staged":
                self.staged[msg["version"]] = time.monotonic()
            super()._send(msg)

        def _commit(self, version):
            self.committed[version] = time.monotonic()
            super()._commit(version)

    import logging

    # Reconnects to each backend's new publisher are expected; keep the table readable.
    logging.getLogger("hotweights_trainer").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    model = torch.nn.Linear(32, 32, bias=False)  # 4 KiB
    rx = Timed(endpoint, model=model, config=SyncConfig(timeout_s=60))
    out.put(("ready", os.getpid(), None))
    try:
        while not stop.is_set():
            try:
                rx.wait_for_version(rx.version + 1, timeout=0.5)
            except Exception:  # noqa: BLE001 - bench loop: timeouts while idle are expected
                continue
            for v in sorted(set(rx.committed) & set(rx.staged)):
                out.put(("v", v, (rx.staged.pop(v), rx.committed.pop(v))))
    finally:
        rx.close()


def run_hotweights(backend: str, n: int, versions: int, endpoint: str, rx_q: "mp.Queue",
                   extra: dict) -> list[float]:
    cfg = SyncConfig(coord_backend=backend, timeout_s=30, **extra)
    overheads = []
    model = torch.nn.Linear(32, 32, bias=False)
    with WeightPublisher(endpoint, config=cfg) as pub:
        pub.wait_for_receivers(n, timeout=120)
        for i in range(versions + 5):
            with torch.no_grad():
                model.weight.add_(1.0)
            v = pub.publish(model).version
            got: dict[int, tuple[float, float]] = {}
            deadline = time.monotonic() + 30
            while len(got) < n:
                kind, key, val = rx_q.get(timeout=max(deadline - time.monotonic(), 0.01))
                if kind == "v" and key == v:
                    got[len(got)] = val
            if i >= 5:  # warm-up versions excluded
                overheads.append(max(c for _, c in got.values()) - max(s for s, _ in got.values()))
    return overheads


# ------------------------------------------------------------------------------------------------ baselines
def _send(sock: socket.socket, obj: dict) -> None:
    body = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv(sock: socket.socket, buf: bytearray) -> dict:
    while True:
        if len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if len(buf) >= 4 + n:
                body = bytes(buf[4:4 + n])
                del buf[:4 + n]
                return json.loads(body)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data


def baseline_client(address: str, out: "mp.Queue") -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(address)
    buf = bytearray()
    staged = {}
    try:
        while True:
            msg = _recv(s, buf)
            if msg["op"] == "end":
                staged[msg["v"]] = time.monotonic()
                _send(s, {"op": "staged", "v": msg["v"]})
            elif msg["op"] == "commit":
                out.put(("v", msg["v"], (staged.pop(msg["v"]), time.monotonic())))
            elif msg["op"] == "quit":
                return
    finally:
        s.close()


def run_baseline(n: int, versions: int) -> list[float]:
    address = f"\0hwt-bench-2pc-{uuid.uuid4().hex[:8]}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(address)
    srv.listen(n)
    ctx = mp.get_context("fork")  # no torch needed in the clients
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=baseline_client, args=(address, q), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    conns = [srv.accept()[0] for _ in range(n)]
    bufs = [bytearray() for _ in conns]
    overheads = []
    try:
        for v in range(versions + 5):
            for c in conns:
                _send(c, {"op": "end", "v": v})
            for c, b in zip(conns, bufs):
                assert _recv(c, b)["op"] == "staged"
            for c in conns:
                _send(c, {"op": "commit", "v": v})
            got = [q.get(timeout=30)[2] for _ in range(n)]
            if v >= 5:
                overheads.append(max(c for _, c in got) - max(s for s, _ in got))
        for c in conns:
            _send(c, {"op": "quit"})
    finally:
        for p in procs:
            p.join(5)
        for c in conns:
            c.close()
        srv.close()
    return overheads


def socket_rtt(reps: int = 200) -> float:
    a, b = socket.socketpair()
    ctx = mp.get_context("fork")

    def echo(sock):
        while True:
            data = sock.recv(64)
            if not data or data == b"q":
                return
            sock.sendall(data)

    p = ctx.Process(target=echo, args=(b,), daemon=True)
    p.start()
    times = []
    for _ in range(reps):
        t = time.monotonic()
        a.sendall(b"x")
        a.recv(64)
        times.append(time.monotonic() - t)
    a.sendall(b"q")
    p.join(5)
    a.close()
    b.close()
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ backends
class Redis:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpCoordinator:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        self.proc = subprocess.Popen([sys.executable, "-m", "hotweights_trainer", "coord", "serve",
                                      "--endpoint", f"tcp://127.0.0.1:{self.port}"],
                                     stdout=subprocess.PIPE, env=env, text=True)
        self.proc.stdout.readline()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def ms(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=40)
    ap.add_argument("--receivers", default="1,4,16")
    ap.add_argument("--backends", default="embedded,redis,tcp")
    ap.add_argument("--quick", action="store_true", help="smoke-sized run: 1 and 2 receivers, 5 versions")
    args = ap.parse_args()
    if args.quick:
        args.versions, args.receivers = 5, "1,2"
    sizes = [int(x) for x in args.receivers.split(",")]
    backends = args.backends.split(",")
    if "redis" in backends and shutil.which("redis-server") is None:
        print("redis-server not found: skipping the redis backend", file=sys.stderr)
        backends.remove("redis")

    rtt = socket_rtt()
    print(f"machine: {os.cpu_count()} CPU cores; Unix-socket round trip (physical floor): {rtt * 1e3:.3f} ms")
    print(f"{args.versions} versions per row after 5 warm-up versions; "
          "overhead = last staged -> commit seen by all\n")
    print("| receivers | control plane | median ms | p90 ms | x floor | x hand 2PC |")
    print("|---:|---|---:|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    for n in sizes:
        base = run_baseline(n, args.versions)
        base_med = statistics.median(base)
        print(f"| {n} | hand-written 2PC | {base_med * 1e3:.3f} | {ms(base, 0.9):.3f} | "
              f"{base_med / rtt:.1f} | 1.00 |", flush=True)
        endpoint = f"shm://bench-cp-{uuid.uuid4().hex[:8]}"
        rx_q: mp.Queue = ctx.Queue()
        stop = ctx.Event()
        procs = [ctx.Process(target=receiver_proc, args=(endpoint, rx_q, stop), daemon=True)
                 for _ in range(n)]
        for p in procs:
            p.start()
        for _ in range(n):
            while rx_q.get(timeout=300)[0] != "ready":
                pass
        try:
            for backend in backends:
                extra: dict = {}
                service = None
                if backend == "redis":
                    service = Redis()
                    extra["redis_url"] = service.url
                elif backend == "tcp":
                    service = TcpCoordinator()
                    extra["coord_endpoint"] = service.endpoint
                try:
                    res = run_hotweights(backend, n, args.versions, endpoint, rx_q, extra)
                finally:
                    if service is not None:
                        service.close()
                while True:  # drop reports of the reconnect catch-up before the next backend
                    try:
                        rx_q.get_nowait()
                    except queue.Empty:
                        break
                med = statistics.median(res)
                print(f"| {n} | hotweights {backend} | {med * 1e3:.3f} | {ms(res, 0.9):.3f} | "
                      f"{med / rtt:.1f} | {med / base_med:.2f} |", flush=True)
        finally:
            stop.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
