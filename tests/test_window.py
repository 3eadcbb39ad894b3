"""The in-flight window controller: pure behaviour, then the blocking gate with real threads."""

from __future__ import annotations

import threading
import time

import pytest

from hotweights_trainer import ConfigError, SyncConfig, SyncTimeoutError
from hotweights_trainer.transports.window import InflightWindow, WindowGate

MB = 1 << 20


def test_window_limits_buckets_in_flight():
    w = InflightWindow(window=2)
    assert w.can_admit(MB)
    w.admitted(MB)
    assert w.can_admit(MB)
    w.admitted(MB)
    assert not w.can_admit(1)
    w.completed(MB, 0.01)
    assert w.can_admit(MB) and w.inflight_buckets == 1 and w.inflight_bytes == MB
    assert w.high_buckets == 2 and w.high_bytes == 2 * MB


def test_byte_cap_holds_and_an_oversized_bucket_still_goes_alone():
    w = InflightWindow(window=8, max_bytes=3 * MB)
    for _ in range(3):
        assert w.can_admit(MB)
        w.admitted(MB)
    assert not w.can_admit(MB)  # a fourth would exceed the cap although the window allows it
    for _ in range(3):
        w.completed(MB, 0.01)
    assert w.can_admit(5 * MB)  # nothing in flight: progress is always possible
    w.admitted(5 * MB)
    assert not w.can_admit(1)
    assert w.high_bytes == 5 * MB


def test_zero_cap_means_off():
    w = InflightWindow(window=3, max_bytes=0)
    for _ in range(3):
        w.admitted(10 ** 12)
    assert w.high_bytes == 3 * 10 ** 12 and not w.can_admit(1)


def test_adaptive_window_moves_one_step_toward_target():
    w = InflightWindow(window=4, adapt=True, target_ms=100, min_inflight=1, max_inflight=8)
    # Buckets take 400 ms in flight, 4x the target: the window shrinks one step per completion.
    for expected in (3, 2, 1, 1):
        w.admitted(MB)
        w.completed(MB, 0.4)
        assert w.window == expected
    assert w.recommended == 1  # clamped to min_inflight
    # Now much faster than the target: it grows again, one step at a time, up to max_inflight.
    windows = []
    for _ in range(12):
        w.admitted(MB)
        w.completed(MB, 0.001)
        windows.append(w.window)
    assert windows == sorted(windows) and windows[-1] == 8
    assert all(b - a <= 1 for a, b in zip(windows, windows[1:]))


def test_adaptive_window_is_steady_at_target():
    w = InflightWindow(window=4, adapt=True, target_ms=50, min_inflight=1, max_inflight=16)
    for _ in range(20):
        w.admitted(MB)
        w.completed(MB, 0.05)
    assert w.window == 4 and w.recommended == 4


def test_without_adapt_window_is_fixed():
    w = InflightWindow(window=3, target_ms=1)
    for _ in range(5):
        w.admitted(MB)
        w.completed(MB, 1.0)
    assert w.window == 3 and w.avg_ms is not None and w.avg_ms > 900


def test_invalid_settings_are_typed_errors():
    with pytest.raises(ConfigError) as info:
        InflightWindow(window=0, max_bytes=-1, min_inflight=5, max_inflight=2)
    assert len(info.value.problems) == 3
    with pytest.raises(ValueError):
        InflightWindow().completed(1, 0.1)


def test_from_config_reads_the_ipc_knobs():
    cfg = SyncConfig.from_env({"HOTWEIGHTS_IPC_INFLIGHT_BUCKETS": "6", "HOTWEIGHTS_IPC_INFLIGHT_BYTES": "1234",
                               "HOTWEIGHTS_IPC_ADAPT": "1", "HOTWEIGHTS_IPC_TARGET_BUCKET_MS": "80",
                               "HOTWEIGHTS_IPC_MIN_INFLIGHT": "2", "HOTWEIGHTS_IPC_MAX_INFLIGHT": "9"})
    w = InflightWindow.from_config(cfg)
    assert (w.window, w.max_bytes, w.adapt, w.target_ms, w.min_inflight, w.max_inflight) == (6, 1234, True, 80, 2, 9)
    assert InflightWindow.from_config(cfg, base=3).window == 3
    assert InflightWindow.from_config(SyncConfig()).window == 4


def test_gate_blocks_until_release_from_another_thread():
    gate = WindowGate(InflightWindow(window=1), timeout_s=5)
    gate.acquire(MB)
    released = threading.Event()

    def later():
        time.sleep(0.2)
        released.set()
        gate.release(MB, 0.2)

    threading.Thread(target=later).start()
    gate.acquire(MB)  # returns only after the release
    assert released.is_set()
    snap = gate.snapshot()
    assert snap["inflight_buckets"] == 1 and snap["inflight_buckets_high"] == 1


def test_gate_times_out_instead_of_hanging():
    gate = WindowGate(InflightWindow(window=1), timeout_s=0.3, name="test")
    gate.acquire(MB)
    t0 = time.monotonic()
    with pytest.raises(SyncTimeoutError, match="still in flight"):
        gate.acquire(MB)
    assert time.monotonic() - t0 < 3
    with pytest.raises(SyncTimeoutError):
        gate.wait_idle(timeout=0.1)


def test_gate_failure_wakes_waiters():
    gate = WindowGate(InflightWindow(window=1), timeout_s=10)
    gate.acquire(MB)
    threading.Timer(0.1, lambda: gate.fail(ConnectionError("gone"))).start()
    with pytest.raises(ConnectionError, match="gone"):
        gate.acquire(MB)
