"""``HostRelay``: one network copy per host, republished to the host's receivers (and to the next host).

A relay is a ``WeightReceiver`` on the upstream endpoint (a publisher, or another host's relay)
whose staging is mirrored into a ``WeightPublisher`` per downstream endpoint: ``shm://NAME`` for
the receivers on this host, and optionally ``tcp://HOST:PORT`` for the next host's relay, so relays
form a pipelined chain or tree. How one version passes through is described in :mod:`.forward`.

Failure handling follows from the engine: a relay that dies is a lost receiver of its upstream
publisher, which aborts the version in flight because a relay stands for a whole host
(``publisher.py``, ``on_lost``); the hosts behind it lose their upstream and discard it; everyone
else applies nothing of it. When the relay comes back it connects again, is sent the last
committed version (catch-up), passes it on, and the hosts behind it follow again. A relay given
several upstreams (the previous host's relay, then one further up) routes around a dead one: when
its upstream stays unreachable for ``heartbeat_ttl_s`` -- the time after which the fleet itself
counts a silent peer as gone -- it follows the next upstream in its list and catches up from there.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Optional, Sequence

from ..config import SyncConfig
from ..errors import ConfigError, HotweightsError, StaleVersionError
from ..publisher import WeightPublisher
from ..receiver import WeightReceiver
from ..transports import parse_endpoint
from .forward import ForwardedBucket, RelayedVersion

log = logging.getLogger(__name__)


def _ignore(items: Any) -> None:
    """The relay's receiver applies nothing: it only passes versions on."""
    for _ in items:
        pass


class HostRelay:
    """Follows ``upstream`` and republishes every version to each endpoint of ``downstream``.

    ``config`` applies to both sides; the relay always runs dense (``delta='off'``), and ``shm://``
    downstream endpoints always use the host-local transport whatever ``config.transport`` says.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, upstream: "str | Sequence[str]", downstream: Sequence[str], *,
                 config: Optional[SyncConfig] = None):
        if not downstream:
            raise ConfigError("a relay needs at least one downstream endpoint (--local shm://NAME)")
        cfg = (config if config is not None else SyncConfig.from_env()).replace(delta="off")
        self.config = cfg
        self.host = socket.gethostname()
        ups = [upstream] if isinstance(upstream, str) else list(upstream)
        if not ups:
            raise ConfigError("a relay needs an upstream endpoint (--upstream tcp://HOST:PORT)")
        self.upstreams = [str(parse_endpoint(ep)) for ep in ups]
        self.upstream = self.upstreams[0]
        self._unreachable_since: Optional[float] = None
        self.downstream = [str(parse_endpoint(ep)) for ep in downstream]
        self._lock = threading.Lock()
        self._current: Optional[RelayedVersion] = None
        self._forwarded = 0  # last version committed upstream and passed on
        self._forwarded_session: Optional[int] = None
        self._forwarded_fp: Optional[str] = None  # content fingerprint of that version
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._pubs: list[WeightPublisher] = []
        try:
            for ep in self.downstream:
                local = parse_endpoint(ep).scheme == "shm"
                self._pubs.append(WeightPublisher(ep, config=cfg.replace(transport="auto") if local else cfg))
            self._rx = WeightReceiver(self.upstream, apply=_ignore, config=cfg, observer=self)
        except BaseException:
            for pub in self._pubs:
                pub.close()
            raise
        log.info("relay on %s: %s -> %s", self.host, self.upstream, ", ".join(self.downstream))

    # ---------------------------------------------------------------- public API
    @property
    def version(self) -> int:
        """The last version this relay passed on (committed upstream and downstream)."""
        return self._forwarded

    @property
    def receiver(self) -> WeightReceiver:
        return self._rx

    @property
    def publishers(self) -> list[WeightPublisher]:
        return list(self._pubs)

    def serve(self, stop: Optional[threading.Event] = None, *, poll_s: float = 0.1) -> None:
        """Run until ``stop`` is set or :meth:`close`: releases each committed upstream version once
        every downstream fleet committed it (the relay's receiver applies nothing)."""
        while not self._closed.is_set() and not (stop is not None and stop.is_set()):
            self.poll()
            self._closed.wait(poll_s)

    def poll(self) -> None:
        try:
            self._rx.poll()
        except HotweightsError as exc:  # a version this relay rejected: already nacked and logged
            log.info("relay: %s", exc)
        self._maybe_reroute(time.monotonic())

    def _maybe_reroute(self, now: float) -> None:
        """Follow the next upstream once this one has been unreachable for ``heartbeat_ttl_s``."""
        if len(self.upstreams) < 2 or self._rx.connected:
            self._unreachable_since = None
            return
        if self._unreachable_since is None:
            self._unreachable_since = now
            return
        if now - self._unreachable_since < self.config.heartbeat_ttl_s:
            return
        old = self.upstream
        self.upstream = self.upstreams[(self.upstreams.index(old) + 1) % len(self.upstreams)]
        self._unreachable_since = None
        log.warning("relay on %s: upstream %s unreachable for %.1fs; following %s", self.host, old,
                    self.config.heartbeat_ttl_s, self.upstream)
        self._rx.close()  # its version in flight (if any) is discarded: downstream aborts it
        self._rx = WeightReceiver(self.upstream, apply=_ignore, config=self.config, observer=self)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            rv = self._current
        if rv is not None:
            rv.decide(False, "relay closing")
        self._rx.close()
        for t in self._threads:
            t.join(timeout=self.config.timeout_s)
        for pub in self._pubs:
            pub.close()
        log.info("relay on %s closed", self.host)

    def __enter__(self) -> "HostRelay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def report(self) -> dict[str, Any]:
        """What this relay tells its upstream (hello, heartbeats): host, endpoints, the fleets it feeds."""
        fleets = []
        for pub in self._pubs:
            try:
                st = pub.status()
            except HotweightsError as exc:
                fleets.append({"endpoint": str(pub.endpoint), "error": str(exc)[:200]})
                continue
            fleets.append({"endpoint": str(pub.endpoint), "committed": st.get("committed", 0),
                           "receivers": [{"rid": r["rid"], "live_version": r["live_version"], "lag": r["lag"]}
                                         for r in st.get("receivers", [])],
                           "relays": st.get("relays", {})})
        return {"host": self.host, "upstream": self.upstream, "version": self._forwarded, "fleets": fleets}

    # ---------------------------------------------------- StagingObserver (receiver thread, lock held)
    def heartbeat_fields(self) -> dict[str, Any]:
        return {"relay": self.report()}

    def on_begin(self, version: int, session: int, step: Optional[int]) -> None:
        with self._lock:
            old = self._current
            if old is not None:
                old.decide(False, f"superseded by version {version}")
            if session == self._forwarded_session and version <= self._forwarded:
                self._current = None  # a catch-up of what we already passed on: stage it, forward nothing
                return
            rv = RelayedVersion(version, session, step, len(self._pubs), self.config.timeout_s,
                                # late-bound: a catch-up can begin before __init__ stored the receiver
                                lambda v: self._rx.confirm_staged(v),
                                lambda v, e: self._rx.reject_staged(v, e))
            self._current = rv
            rv.held = version <= self._forwarded
            if not rv.held:
                self._start(rv)
            # else: a catch-up from a new upstream session (the relay before us restarted). Hold it
            # until its end: when its bytes are the version we passed on, forwarding it again would
            # renumber everything behind us; otherwise it goes on (on_end).

    def _start(self, rv: RelayedVersion) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        for i, pub in enumerate(self._pubs):
            t = threading.Thread(target=self._drive, args=(pub, rv, i), daemon=True,
                                 name=f"hotweights-relay-v{rv.version}-{i}")
            self._threads.append(t)
            t.start()

    def on_bucket(self, version: int, index: int, header: Any, data: memoryview) -> None:
        rv = self._current
        if rv is not None and rv.version == version:
            rv.add(ForwardedBucket(header, data))

    def on_end(self, version: int, n_buckets: int) -> bool:
        rv = self._current
        if rv is None or rv.version != version:
            return False  # nothing forwarded (a catch-up we already have): answer staged at once
        rv.end(n_buckets)
        if rv.held:
            if rv.fingerprint() == self._forwarded_fp:
                log.info("relay: version %d from a new upstream session is the one already passed on",
                         version)
                self._current = None
                return False
            self._start(rv)
        return True

    def on_decision(self, version: int, committed: bool, reason: str) -> None:
        with self._lock:
            rv = self._current
            if rv is None or rv.version != version:
                return
            rv.decide(committed, reason)
            self._current = None
            if committed:
                self._forwarded = version
                self._forwarded_session = rv.session
                self._forwarded_fp = rv.fingerprint()

    # ---------------------------------------------------------------- one downstream fleet, one version
    def _drive(self, pub: WeightPublisher, rv: RelayedVersion, i: int) -> None:
        t0 = time.perf_counter()
        try:
            pub.publish(rv.feed(i), step=rv.step)
            log.info("relay: version %d passed on to %s in %.3fs", rv.version, pub.endpoint,
                     time.perf_counter() - t0)
        except StaleVersionError as exc:
            # Typically a restarted relay's catch-up: the fleet behind it kept running this version
            # (or a newer one) and numbers above it. Nothing to send; it counts as staged there.
            log.info("relay: %s is already past version %d; nothing to pass on (%s)", pub.endpoint,
                     rv.version, exc)
            rv.already_there(i)
        except HotweightsError as exc:
            log.warning("relay: version %d not passed on to %s: %s", rv.version, pub.endpoint, exc)
            rv.failed(str(pub.endpoint), exc)
        except Exception as exc:  # noqa: BLE001 - a bug must still fail the version upstream, not hang it
            log.exception("relay: unexpected error passing version %d to %s", rv.version, pub.endpoint)
            rv.failed(str(pub.endpoint), exc)
            raise


__all__ = ["HostRelay"]
