"""Peak extra memory of this process while a block runs (Linux), for tests and benchmarks.

Instrumentation, not part of the package: the ZeRO-3 memory tests and ``bench/bench_zero3.py`` use it.

Method: ``RssAnon`` from ``/proc/self/status`` (anonymous resident memory, i.e. heap and tensors;
shared-memory buckets are not included) is read before the block, by a background thread about every
``interval_s`` during it, and at every :meth:`PeakMemory.probe` call placed where the peak is
expected (inside each gather). ``extra_bytes`` is the highest reading minus the one before.

malloc keeps freed memory for reuse, so RSS only follows live tensors when large allocations are
mapped one by one and returned on free: start the measured process with
``MALLOC_MMAP_THRESHOLD_=65536`` (what the tests and benchmarks do). Without it the numbers are lower
bounds.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Optional

_FIELD = b"RssAnon:"


def rss_anon_bytes() -> Optional[int]:
    """Anonymous resident memory of this process in bytes, or None where /proc is unavailable."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(_FIELD):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.extra_bytes``."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.base: Optional[int] = None
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def probe(self) -> None:
        value = rss_anon_bytes()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.probe()

    def __enter__(self) -> "PeakMemory":
        self.base = rss_anon_bytes()
        self.peak = self.base
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hotweights-memprobe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.probe()

    @property
    def extra_bytes(self) -> int:
        if self.base is None or self.peak is None:
            return 0
        return max(self.peak - self.base, 0)


def watch_gathers(on_gather: Callable[[], None]) -> list[Any]:
    """Call ``on_gather()`` inside every ZeRO-3 gather of this process, while the group holds its full
    data (its peak-memory moment), and collect every ``ShardedSource`` made from now on (their
    ``stats``). Works by wrapping the gather module's ``deepspeed_gather`` and ``sharded_source``,
    which the package looks up when a source is made. ``on_gather`` must not run collectives."""
    from hotweights_trainer.integrations import gather

    sources: list[Any] = []
    real_gather, real_source = gather.deepspeed_gather, gather.sharded_source

    @contextlib.contextmanager
    def gathered(tensors):
        with real_gather(tensors) as value:
            on_gather()
            yield value

    def source(*args, **kwargs):
        made = real_source(*args, **kwargs)
        sources.append(made)
        return made

    gather.deepspeed_gather = gathered
    gather.sharded_source = source
    return sources
