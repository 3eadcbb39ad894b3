"""Metrics are measured: scrape the HTTP exporters of a real publisher and a real receiver process
during a sync and check every value against what happened."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading

import pytest
import torch

from hotweights_trainer import ManifestMismatchError, SyncConfig, WeightPublisher, WeightReceiver, metrics
from hotweights_trainer import metrics_client as mc
from hotweights_trainer.errors import MetricsError

from tests.conftest import ROOT, child_env, free_port
from tests.procs.common import SpecModule, make_tensors, mixed_spec
from tests.procs.spawn import Proc, write_spec
from tests.procs.warm import popen

PUBLISHER_PHASES = ("gather", "encode", "transfer", "commit")


class CommandProc(Proc):
    """A test process that also reads commands from stdin."""

    def __init__(self, args: list[str], *, env: dict):
        self.p = popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self._start_readers()

    def _start_readers(self) -> None:
        import queue

        self._q = queue.Queue()
        self._err = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self._err.extend(self.p.stderr), daemon=True).start()

    def command(self, line: str, timeout: float = 60) -> dict:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.next(timeout)


def scrape(port: int) -> dict[str, mc.Family]:
    return mc.scrape(mc.url_for("127.0.0.1", port), timeout=10, max_bytes=1 << 20)


def value(fams: dict[str, mc.Family], family: str, sample: str | None = None, **labels: str):
    fam = fams.get(family)
    return None if fam is None else fam.value(sample, **labels)


def test_scrape_during_real_sync_matches_what_happened(endpoint):
    spec = mixed_spec(n_small=8, big_elems=300_000)
    spec_path = write_spec(spec)
    pub_port, rx_port = free_port(), free_port()
    rx = CommandProc(["-m", "tests.procs.metrics_receiver", "--endpoint", endpoint, "--spec", spec_path],
                     env=child_env(HOTWEIGHTS_METRICS_PORT=str(rx_port)))
    ep = {"endpoint": endpoint}
    try:
        rid = rx.next()["receiver_id"]
        rl = {"endpoint": endpoint, "receiver": rid}
        cfg = SyncConfig(metrics_port=pub_port, bucket_mb=1, timeout_s=30)
        with WeightPublisher(endpoint, config=cfg) as pub:
            pub.wait_for_receivers(1, timeout=30)
            p = scrape(pub_port)
            assert value(p, "hotweights_receivers", **ep) == 1
            assert value(p, "hotweights_publisher_version", **ep) is None  # nothing committed yet

            results = [pub.publish(make_tensors(spec, seed=1))]
            assert results[0].buckets > 1  # several buckets really moved
            # Committed, but the receiver's owner has not applied it yet: it lags one version.
            r = scrape(rx_port)
            assert value(r, "hotweights_version_lag", **rl) == 1
            assert value(r, "hotweights_receiver_version", **rl) is None

            applied = [rx.command("apply 1")]
            assert applied[0]["version"] == 1
            r = scrape(rx_port)
            assert value(r, "hotweights_receiver_version", **rl) == 1
            assert value(r, "hotweights_version_lag", **rl) == 0

            # Two more versions before the receiver applies again: it lags two, then jumps to 3.
            results += [pub.publish(make_tensors(spec, seed=2)), pub.publish(make_tensors(spec, seed=3))]
            assert value(scrape(rx_port), "hotweights_version_lag", **rl) == 2
            applied.append(rx.command("apply 3"))
            assert applied[-1]["version"] == 3

            p, r = scrape(pub_port), scrape(rx_port)
            sent = sum(res.bytes_sent for res in results)
            assert value(p, "hotweights_bytes", "hotweights_bytes_total", **ep) == sent
            # Dense-equivalent bytes: what a dense send would take (delta sync is on by default).
            dense = sum(res.dense_bytes for res in results)
            assert value(p, "hotweights_dense_bytes", "hotweights_dense_bytes_total", **ep) == dense
            assert value(p, "hotweights_publisher_version", **ep) == 3 == pub.version
            assert value(r, "hotweights_receiver_version", **rl) == 3
            assert value(r, "hotweights_version_lag", **rl) == 0
            for phase in PUBLISHER_PHASES:
                count = value(p, "hotweights_sync_seconds", "hotweights_sync_seconds_count", phase=phase, **ep)
                total = value(p, "hotweights_sync_seconds", "hotweights_sync_seconds_sum", phase=phase, **ep)
                assert count == 3, phase
                assert total == pytest.approx(sum(res.phases[phase] for res in results), rel=1e-9, abs=1e-12)
            # apply is measured where it happens: in the receiver process, once per applied version.
            assert value(p, "hotweights_sync_seconds", "hotweights_sync_seconds_count", phase="apply", **ep) is None
            assert value(r, "hotweights_sync_seconds", "hotweights_sync_seconds_count", phase="apply", **ep) == 2
            assert value(r, "hotweights_sync_seconds", "hotweights_sync_seconds_sum", phase="apply", **ep) == \
                pytest.approx(sum(a["apply_seconds"] for a in applied), rel=1e-9, abs=1e-12)

            # A version the receiver rejects: counted as an error on both sides, nothing else moves.
            bad = dict(make_tensors(spec, seed=4), **{"not.in.model": torch.ones(3)})
            with pytest.raises(ManifestMismatchError):
                pub.publish(bad)
            p, r = scrape(pub_port), scrape(rx_port)
            kind = {"kind": "ManifestMismatchError", **ep}
            assert value(p, "hotweights_errors", "hotweights_errors_total", **kind) == 1
            assert value(r, "hotweights_errors", "hotweights_errors_total", **kind) == 1
            assert value(p, "hotweights_bytes", "hotweights_bytes_total", **ep) == sent
            assert value(p, "hotweights_publisher_version", **ep) == 3
            assert value(r, "hotweights_version_lag", **rl) == 0  # the aborted version never goes live
            assert rx.command("apply 4")["error"] == "ManifestMismatchError"  # reported once to the owner

            results.append(pub.publish(make_tensors(spec, seed=5)))
            assert rx.command("apply 4")["version"] == results[-1].version == 5
            p, r = scrape(pub_port), scrape(rx_port)
            assert value(p, "hotweights_bytes", "hotweights_bytes_total", **ep) == sum(x.bytes_sent for x in results)
            assert value(p, "hotweights_publisher_version", **ep) == 5
            assert value(r, "hotweights_receiver_version", **rl) == 5
            assert value(r, "hotweights_version_lag", **rl) == 0
        rx.p.stdin.write("quit\n")
        rx.p.stdin.flush()
        assert rx.wait(30) == 0
    finally:
        rx.kill()


def test_two_publishers_in_one_process_share_the_registry(endpoint):
    port = free_port()
    spec = mixed_spec(n_small=3, big_elems=1000)
    eps = [endpoint, endpoint + "-b"]
    pubs = [WeightPublisher(e, config=SyncConfig(metrics_port=port, timeout_s=20)) for e in eps]
    rxs = [WeightReceiver(e, model=SpecModule(spec), config=SyncConfig(timeout_s=20)) for e in eps]
    try:
        for pub in pubs:
            pub.wait_for_receivers(1, timeout=20)
        res = [pubs[0].publish(make_tensors(spec, 1)), pubs[1].publish(make_tensors(spec, 2)),
               pubs[1].publish(make_tensors(spec, 3))]
        for rx, v in zip(rxs, (1, 2)):
            assert rx.wait_for_version(v) == v
        fams = scrape(port)  # one exporter, both publishers (and both receivers) on it
        assert value(fams, "hotweights_publisher_version", endpoint=eps[0]) == 1
        assert value(fams, "hotweights_publisher_version", endpoint=eps[1]) == 2
        assert value(fams, "hotweights_bytes", "hotweights_bytes_total", endpoint=eps[1]) == \
            res[1].bytes_sent + res[2].bytes_sent
        assert value(fams, "hotweights_receiver_version", endpoint=eps[1], receiver=rxs[1].receiver_id) == 2
        # Nothing leaks into prometheus_client's global registry, which belongs to the application.
        from prometheus_client import REGISTRY as GLOBAL, generate_latest

        assert b"hotweights_" not in generate_latest(GLOBAL)
        assert metrics.snapshot()[f'hotweights_publisher_version{{endpoint="{eps[1]}"}}'] == 2
    finally:
        for obj in rxs + pubs:
            obj.close()


def test_taken_metrics_port_is_a_typed_error_and_starts_nothing(endpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(MetricsError, match=f"{port}.*HOTWEIGHTS_METRICS_PORT"):
            WeightPublisher(endpoint, config=SyncConfig(metrics_port=port))
    # The failed publisher did not half-start its transport: the endpoint is free.
    with WeightPublisher(endpoint, config=SyncConfig(timeout_s=5)) as pub:
        assert pub.version == 0


class _Junk(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body,limit,match", [
    (b"# TYPE x counter\nx_total{a=\"1\"} 1\n" * 200, 1000, "exceed 1000 bytes"),
    (b"this is {not prometheus text\n", 1 << 20, "not Prometheus text"),
    (b"\xff\xfe\x00 binary", 1 << 20, "not UTF-8"),
])
def test_scrape_validates_what_it_reads(body, limit, match):
    handler = type("H", (_Junk,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(MetricsError, match=match):
            mc.scrape(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=10, max_bytes=limit)
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_errors_are_typed():
    with pytest.raises(MetricsError, match="http://"):
        mc.fetch("file:///etc/passwd", timeout=1, max_bytes=100)
    with pytest.raises(MetricsError, match="cannot read metrics"):
        mc.fetch(mc.url_for("127.0.0.1", free_port()), timeout=5, max_bytes=100)


def test_snapshot_json_is_plain_data():
    fams = mc.parse(metrics.exposition().decode())
    json.dumps(mc.to_json(fams))  # serialisable as is
    assert all(name.startswith("hotweights_") and not name.endswith("_created") for name in fams)
