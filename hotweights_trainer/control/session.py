"""``FleetSession``: what a publisher holds, the coordinator API bound to its fleet and claimed epoch.

The publisher's engine sees the coordinator only as :class:`CoordinatorApi`: one method per
operation, answers as the typed records of :mod:`.records`. :class:`FleetSession` implements it over
any backend; :func:`open_session` picks the backend from ``SyncConfig.coord_backend``:

- ``embedded`` (default): a :class:`~.coordinator.Coordinator` in this process, state in memory.
  Nothing to start; every call is a direct method call, nothing serialised (microseconds).
- ``redis``: a Coordinator in this process, called the same way, whose state is serialised to Redis
  (``redis_url``) and written only while this process holds the fleet's leader lease. A restarted
  publisher resumes the fleet: version numbering continues and receivers keep serving what they run.
- ``tcp``: the Coordinator runs in ``hotweights coord serve`` (``coord_endpoint``, several for
  failover); every call is serialised into a request over TCP (:mod:`.client`, :mod:`.rpc`).

Whichever backend answered, the answer is parsed into a record with every field checked, so the
engine never indexes a dict.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Protocol, Sequence

from ..config import SyncConfig
from ..errors import NotLeaderError, SyncTimeoutError
from .coordinator import Coordinator
from .handles import Handle
from .janitor import HOST
from .records import (Begun, Claimed, Committed, Decision, Left, Registered, Swept, format_key)

log = logging.getLogger(__name__)


class CoordinatorApi(Protocol):
    """The coordinator as the publisher's engine calls it, bound to the engine's fleet and epoch."""

    backend: str
    epoch: int
    claimed: Claimed

    def register(self, rid: str, pid: int, host: str, live_version: int) -> Registered: ...

    def heartbeat(self, rid: str, live_version: int) -> bool: ...

    def leave(self, rid: str) -> Left: ...

    def begin(self, step: Optional[int], min_version: Optional[int] = None) -> Begun: ...

    def seal(self, version: int, digest: str, n_buckets: int) -> Decision: ...

    def precommit(self, rid: str, version: int, digest: Optional[str]) -> Decision: ...

    def nack(self, rid: str, version: int, reason: str) -> Decision: ...

    def commit(self, version: int) -> Committed: ...

    def abort(self, version: int, reason: str, kind: str) -> bool: ...

    def post_handles(self, version: int, handles: Sequence[tuple[int, int, str, str]], owner: str,
                     holders: list[str]) -> int: ...

    def ack(self, rid: str, version: int) -> list[Handle]: ...

    def sweep(self) -> Swept: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class FleetSession:
    """The coordinator API bound to one fleet and the epoch this publisher claimed.

    ``call(method, args)`` reaches the coordinator: :meth:`.coordinator.Coordinator.call` in this
    process, or :meth:`.client.CoordClient.call` across TCP. Answers come back as the typed records
    of :mod:`.records`, every field checked, whichever backend answered.
    """

    def __init__(self, fleet: str, call: Callable[[str, dict[str, Any]], Any], backend: str,
                 close: Callable[[], None] = lambda: None):
        self.fleet = fleet
        self.backend = backend
        self._call = call
        self._close = close
        self.epoch = 0
        self.claimed = Claimed(0, 0)

    def claim(self, owner: dict[str, Any]) -> Claimed:
        self.claimed = Claimed.parse(self._call("claim", {"owner": owner}))
        self.epoch = self.claimed.epoch
        return self.claimed

    def register(self, rid: str, pid: int, host: str, live_version: int) -> Registered:
        return Registered.parse(self._call("register", {"epoch": self.epoch, "rid": rid, "pid": pid,
                                                        "host": host, "live_version": live_version}))

    def heartbeat(self, rid: str, live_version: int) -> bool:
        return bool(self._call("heartbeat", {"epoch": self.epoch, "rid": rid, "live_version": live_version}))

    def leave(self, rid: str) -> Left:
        return Left.parse(self._call("leave", {"epoch": self.epoch, "rid": rid}))

    def begin(self, step: Optional[int], min_version: Optional[int] = None) -> Begun:
        return Begun.parse(self._call("begin", {"epoch": self.epoch, "step": step,
                                                "min_version": min_version}))

    def seal(self, version: int, digest: str, n_buckets: int) -> Decision:
        return Decision.parse(self._call("seal", {"epoch": self.epoch, "version": version, "digest": digest,
                                                  "n_buckets": n_buckets}), "seal")

    def precommit(self, rid: str, version: int, digest: Optional[str]) -> Decision:
        return Decision.parse(self._call("precommit", {"epoch": self.epoch, "rid": rid, "version": version,
                                                       "digest": digest}), "precommit")

    def nack(self, rid: str, version: int, reason: str) -> Decision:
        return Decision.parse(self._call("nack", {"epoch": self.epoch, "rid": rid, "version": version,
                                                  "reason": reason}), "nack")

    def commit(self, version: int) -> Committed:
        return Committed.parse(self._call("commit", {"epoch": self.epoch, "version": version}))

    def abort(self, version: int, reason: str, kind: str) -> bool:
        return bool(self._call("abort", {"epoch": self.epoch, "version": version, "reason": reason,
                                         "kind": kind}))

    def post_handles(self, version: int, handles: Sequence[tuple[int, int, str, str]], owner: str,
                     holders: list[str]) -> int:
        """Post ``(version, index, name, signature)`` handles held by ``holders``."""
        items = [[format_key((v, i)), name, sig] for v, i, name, sig in handles]
        return self._call("post_handles", {"epoch": self.epoch, "version": version, "handles": items,
                                           "owner": owner, "holders": holders})

    def ack(self, rid: str, version: int) -> list[Handle]:
        return [Handle.from_dict(h) for h in self._call("ack", {"epoch": self.epoch, "rid": rid,
                                                               "version": version})]

    def sweep(self) -> Swept:
        return Swept.parse(self._call("sweep", {"epoch": self.epoch}))

    def status(self) -> dict[str, Any]:
        return self._call("status", {})

    def close(self) -> None:
        self._close()


def open_session(fleet: str, config: SyncConfig) -> FleetSession:
    """Connect to the fleet's coordinator (backend from ``config``) and claim the fleet for this publisher."""
    owner = {"host": HOST, "pid": os.getpid(), "fleet": fleet}
    backend = config.coord_backend
    if backend == "tcp":
        from .client import CoordClient, parse_endpoints

        client = CoordClient(parse_endpoints(config.coord_endpoint), token=config.coord_token,
                             timeout_s=config.timeout_s, max_message_bytes=config.max_message_bytes)
        session = FleetSession(fleet, lambda m, a: client.call(fleet, m, a), backend, client.close)
    else:
        store = None
        if backend == "redis":
            from .redis_store import RedisStore

            store = RedisStore(fleet, config.redis_url, lease_ms=config.coord_lease_ms,
                               timeout_s=config.timeout_s,
                               holder={"endpoint": f"publisher {HOST}:{os.getpid()}", "host": HOST,
                                       "pid": os.getpid()})
        coord = Coordinator(fleet, config, store)
        ops = {name[3:]: getattr(coord, name) for name in dir(coord) if name.startswith("op_")}
        session = FleetSession(fleet, lambda m, a: ops[m](**a), backend, coord.close)
        if backend == "redis":
            _wait_for_lease(coord, config)
    try:
        session.claim(owner)
    except BaseException:
        session.close()
        raise
    return session


def _wait_for_lease(coord: Coordinator, config: SyncConfig) -> None:
    """A previous publisher of this fleet may still hold the lease (it died moments ago): wait it out."""
    deadline = time.monotonic() + config.timeout_s
    logged = False
    while True:
        try:
            coord.store.ensure_leader()
            return
        except NotLeaderError as exc:
            if time.monotonic() >= deadline:
                raise SyncTimeoutError(f"could not become the coordinator of {coord.fleet} within "
                                       f"{config.timeout_s:.1f}s: {exc}") from None
            if not logged:
                log.info("waiting for the leader lease of %s: %s", coord.fleet, exc)
                logged = True
            time.sleep(min(config.coord_lease_ms / 4000.0, 0.25))


__all__ = ["Begun", "Claimed", "Committed", "CoordinatorApi", "Decision", "FleetSession", "Left",
           "Registered", "Swept", "open_session"]
