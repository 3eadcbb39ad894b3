"""Receiver heartbeats: a thread telling the publisher (and so the coordinator) "alive, at version N".

It runs independently of the serving thread, so a receiver whose owner is busy (or never calls
``poll``) stays a member; a receiver that is frozen or dead stops beating and is evicted after
``heartbeat_ttl_s``, so it no longer holds up a quorum.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from ..errors import HotweightsError

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, send: Callable[[dict[str, Any]], None], connected: Callable[[], bool],
                 live_version: Callable[[], int], interval_s: float, name: str,
                 extra: Optional[Callable[[], dict[str, Any]]] = None):
        self._send = send
        self._extra = extra  # a host relay adds its report of the receivers behind it
        self._connected = connected
        self._live = live_version
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hotweights-heartbeat-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._interval):
            if not self._connected():
                continue
            try:
                extra = self._extra() if self._extra is not None else {}
                self._send({**extra, "op": "heartbeat", "live_version": self._live()})
                failures = 0
            except HotweightsError as exc:
                failures += 1
                if failures == 1:
                    log.info("heartbeat not sent (%s); the connection will be re-established", exc)

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._interval + 1.0)


__all__ = ["Heartbeat"]
