"""The coordinator state machine of one fleet (one publisher endpoint and its receivers). Pure logic.

States and transitions
======================

Fleet: ``epoch`` (fencing token of the publisher in charge), ``committed`` (last committed version),
``next_version``, ``members`` (registered receivers), at most one ``open`` version, and the
:class:`~.handles.HandleTable`.

::

    claim ──► epoch+1, members cleared, an open version of the previous epoch aborted
    register(rid, live) ──► member (live version, heartbeat now); numbering continues above ``live``
    heartbeat(rid, live) ──► member's heartbeat renewed
    leave(rid) / evict (no heartbeat for heartbeat_ttl_s) ──► member gone, not counted in any quorum

    begin ──► OPEN(version = next_version, quorum = members now)
    OPEN ── seal(digest, n_buckets) ──► OPEN, sealed
    OPEN ── precommit(rid, digest) / nack(rid, error) ──► OPEN (decision re-evaluated)
    OPEN ── commit ──► COMMITTED  (refused unless the quorum is met)
    OPEN ── abort / deadline ──► ABORTED  (receivers discard the version; nobody applies it)

Decision for the open version (never stored, always recomputed): the *live quorum* is the quorum
snapshot at ``begin`` minus members that left or were evicted since.

- ``quorum="all"``: commit once the version is sealed and every live quorum member precommitted;
  abort on any nack.
- ``quorum="majority"``: commit once sealed and more than half of the live quorum precommitted;
  abort once a majority can no longer be reached. Members that nacked are told to resync (the
  publisher disconnects them and they catch up); members still staging get the commit when they stage.
- After ``deadline`` (``timeout_s`` after begin) without a commit: abort.

Fencing: every mutating call carries the caller's ``epoch``; a call from an older epoch raises
:class:`~hotweights_trainer.errors.FencedError`, so a stale publisher can never begin or commit
anything once a newer one claimed the fleet. A version is committed only if it is the open one and
newer than ``committed``, so nothing ever commits over a newer version.

Late joiners: ``register`` reports the committed version; the publisher sends it in full (catch-up)
and the joiner is in the quorum of every version begun after it registered.

Every change records what it touched in a dirty set (``meta``, ``open``, ``member:RID``,
``handle:KEY``), so a persistent store (Redis) writes exactly that, atomically, before the caller
hears the result.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CoordinatorError, FencedError, StaleVersionError
from .handles import Handle, HandleTable

QUORUM_POLICIES = ("all", "majority")
RECENT = 16  # outcomes kept for status


@dataclass
class Member:
    rid: str
    pid: int
    host: str
    live_version: int
    registered_at: float
    last_heartbeat: float

    def to_dict(self) -> dict[str, Any]:
        return {"rid": self.rid, "pid": self.pid, "host": self.host, "live_version": self.live_version,
                "registered_at": self.registered_at, "last_heartbeat": self.last_heartbeat}

    @classmethod
    def from_dict(cls, d: Any) -> "Member":
        _expect(d, {"rid": str, "pid": int, "host": str, "live_version": int,
                    "registered_at": (int, float), "last_heartbeat": (int, float)}, "member")
        return cls(d["rid"], d["pid"], d["host"], d["live_version"], float(d["registered_at"]),
                   float(d["last_heartbeat"]))


@dataclass
class OpenVersion:
    version: int
    epoch: int
    step: Optional[int]
    quorum: list[str]
    began_at: float
    deadline: float
    precommits: set[str] = field(default_factory=set)
    nacks: dict[str, str] = field(default_factory=dict)
    digest: Optional[str] = None
    n_buckets: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "epoch": self.epoch, "step": self.step, "quorum": self.quorum,
                "began_at": self.began_at, "deadline": self.deadline, "precommits": sorted(self.precommits),
                "nacks": self.nacks, "digest": self.digest, "n_buckets": self.n_buckets}

    @classmethod
    def from_dict(cls, d: Any) -> "OpenVersion":
        _expect(d, {"version": int, "epoch": int, "quorum": list, "began_at": (int, float),
                    "deadline": (int, float), "precommits": list, "nacks": dict}, "open version")
        for k in ("step", "n_buckets"):
            if d.get(k) is not None and (not isinstance(d[k], int) or isinstance(d[k], bool)):
                raise CoordinatorError(f"stored open version: {k} must be an integer")
        if d.get("digest") is not None and not isinstance(d["digest"], str):
            raise CoordinatorError("stored open version: digest must be a string")
        if not all(isinstance(x, str) for x in d["quorum"] + d["precommits"]) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in d["nacks"].items()):
            raise CoordinatorError("stored open version: receiver ids and nack reasons must be strings")
        return cls(d["version"], d["epoch"], d.get("step"), list(d["quorum"]), float(d["began_at"]),
                   float(d["deadline"]), set(d["precommits"]), dict(d["nacks"]), d.get("digest"),
                   d.get("n_buckets"))


def _expect(d: Any, schema: dict[str, Any], what: str) -> None:
    if not isinstance(d, dict):
        raise CoordinatorError(f"stored {what} is not an object")
    for key, tp in schema.items():
        v = d.get(key)
        if not isinstance(v, tp) or isinstance(v, bool):
            raise CoordinatorError(f"stored {what}: field {key!r} has the wrong type ({type(v).__name__})")


class FleetState:
    """One fleet's coordinator state. Pure: no I/O, no clock (``now`` is passed to every call)."""

    def __init__(self, fleet: str, *, quorum: str = "all", heartbeat_ttl_s: float = 5.0,
                 version_timeout_s: float = 60.0, handle_ttl_s: float = 30.0, generation: str = ""):
        if quorum not in QUORUM_POLICIES:
            raise CoordinatorError(f"quorum policy must be one of {', '.join(QUORUM_POLICIES)}, "
                                   f"got {quorum!r}")
        self.fleet = fleet
        self.policy = quorum
        self.heartbeat_ttl_s = float(heartbeat_ttl_s)
        self.version_timeout_s = float(version_timeout_s)
        self.generation = generation or secrets.token_hex(8)
        self.epoch = 0
        self.committed = 0
        self.committed_digest = ""
        self.committed_step: Optional[int] = None
        self.next_version = 1
        self.members: dict[str, Member] = {}
        self.open: Optional[OpenVersion] = None
        self.handles = HandleTable(handle_ttl_s)
        self.counters = {"commits": 0, "aborts": 0, "quorum_failures": 0, "evictions": 0}
        self.recent: list[dict[str, Any]] = []
        self._dirty: set[str] = set()

    # ---------------------------------------------------------------- persistence
    def mark_all_dirty(self) -> None:
        self._dirty |= {"meta", "open"} | {f"member:{r}" for r in self.members}
        self.handles.dirty |= set(self.handles.handles)

    def take_dirty(self) -> set[str]:
        out = self._dirty | {f"handle:{k}" for k in self.handles.take_dirty()}
        self._dirty = set()
        return out

    def meta(self) -> dict[str, Any]:
        return {"generation": self.generation, "epoch": self.epoch, "committed": self.committed,
                "committed_digest": self.committed_digest, "committed_step": self.committed_step,
                "next_version": self.next_version, "counters": self.counters, "recent": self.recent}

    def load(self, meta: Any, members: dict[str, Any], open_: Any, handles: dict[str, Any]) -> None:
        """Restore from stored pieces (validated: a store is another process's output)."""
        _expect(meta, {"generation": str, "epoch": int, "committed": int, "committed_digest": str,
                       "next_version": int, "counters": dict, "recent": list}, "fleet metadata")
        step = meta.get("committed_step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise CoordinatorError("stored fleet metadata: committed_step must be an integer")
        if meta["next_version"] <= meta["committed"]:
            raise CoordinatorError(f"stored fleet metadata is inconsistent: next_version "
                                   f"{meta['next_version']} "
                                   f"<= committed {meta['committed']}")
        self.generation = meta["generation"]
        self.epoch, self.committed = meta["epoch"], meta["committed"]
        self.committed_digest, self.committed_step = meta["committed_digest"], step
        self.next_version = meta["next_version"]
        self.counters.update({k: int(v) for k, v in meta["counters"].items()
                              if k in self.counters and isinstance(v, int)})
        self.recent = [r for r in meta["recent"] if isinstance(r, dict)][-RECENT:]
        self.members = {}
        for rid, d in members.items():
            m = Member.from_dict(d)
            if m.rid != rid:
                raise CoordinatorError(f"stored member {rid!r} names itself {m.rid!r}")
            self.members[rid] = m
        self.open = OpenVersion.from_dict(open_) if open_ is not None else None
        self.handles.pinned = set(self.pinned_versions())
        self.handles.handles = {}
        for key, d in handles.items():
            h = Handle.from_dict(d)
            if h.key != key:
                raise CoordinatorError(f"stored handle {key!r} names itself {h.key!r}")
            self.handles.handles[key] = h

    # ---------------------------------------------------------------- fencing
    def _fence(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise FencedError(f"fleet {self.fleet}: request from publisher epoch {epoch}, but epoch "
                              f"{self.epoch} claimed the fleet since; the stale publisher may not write")

    def claim(self, now: float) -> int:
        """A publisher takes charge of the fleet: a new epoch fences every older publisher.

        Members are cleared: receivers register again as they connect to the new publisher. The
        caller takes over the old epoch's handles with :meth:`take_over_handles`.
        """
        self.epoch += 1
        if self.open is not None:
            self._close_open("aborted", "publisher restarted (new epoch)", now, "restart")
        self._dirty |= {"meta"} | {f"member:{r}" for r in self.members}
        self.members.clear()
        return self.epoch

    def take_over_handles(self) -> list[Handle]:
        """Handles posted by earlier epochs: nobody renews them any more. Removed and returned (expired)."""
        old = list(self.handles.handles.values())
        for h in old:
            del self.handles.handles[h.key]
            self.handles.dirty.add(h.key)
        self.handles.expired += len(old)
        return old

    # ---------------------------------------------------------------- membership
    def register(self, epoch: int, rid: str, pid: int, host: str, live_version: int,
                 now: float) -> dict[str, Any]:
        self._fence(epoch)
        _check_rid(rid)
        if live_version < 0:
            raise CoordinatorError(f"receiver {rid}: live version must be >= 0, got {live_version}")
        self.members[rid] = Member(rid, pid, host, live_version, now, now)
        self._dirty.add(f"member:{rid}")
        if live_version >= self.next_version:
            # A receiver runs a version this coordinator never numbered (its state was lost or is
            # new): continue numbering above it, never below.
            self.next_version = live_version + 1
            self._dirty.add("meta")
        return {"committed": self.committed, "next_version": self.next_version,
                "catch_up": live_version < self.committed}

    def heartbeat(self, epoch: int, rid: str, live_version: int, now: float) -> bool:
        """Renew ``rid``'s liveness; False if it is not a member (evicted: it must re-register)."""
        self._fence(epoch)
        m = self.members.get(rid)
        if m is None:
            return False
        m.last_heartbeat = now
        if live_version >= 0:
            m.live_version = live_version
        self._dirty.add(f"member:{rid}")
        return True

    def leave(self, epoch: int, rid: str, now: float) -> dict[str, Any]:
        """``rid`` disconnected. Returns the open version's decision and the handles its leaving released."""
        self._fence(epoch)
        if self.members.pop(rid, None) is not None:
            self._dirty.add(f"member:{rid}")
        released = self.handles.forget_holder(rid, now)
        return {"decision": self.decision(now), "released": [h.key for h in released]}

    def evict_expired(self, now: float) -> tuple[list[str], list[Handle]]:
        """Remove members whose last heartbeat is older than ``heartbeat_ttl_s``; their holds end."""
        gone = [rid for rid, m in self.members.items() if now - m.last_heartbeat > self.heartbeat_ttl_s]
        released: list[Handle] = []
        for rid in gone:
            del self.members[rid]
            self._dirty.add(f"member:{rid}")
            released += self.handles.forget_holder(rid, now)
        if gone:
            self.counters["evictions"] += len(gone)
            self._dirty.add("meta")
        return gone, released

    # ---------------------------------------------------------------- one version
    def begin(self, epoch: int, step: Optional[int], now: float,
              min_version: Optional[int] = None) -> dict[str, Any]:
        """Open the next version. ``min_version`` (a host relay) numbers it at least that high, so a
        relayed version keeps the number its upstream fleet gave it; numbers never go backwards.

        A relayed version below ``next_version`` is refused (:class:`StaleVersionError`) rather than
        renumbered: its receivers already run it or a newer one, and a renumbered version would
        collide with the number upstream gives its next version (relay/forward.py).
        """
        self._fence(epoch)
        if min_version is not None and min_version < self.next_version:
            raise StaleVersionError(f"fleet {self.fleet}: relayed version {min_version} is already numbered "
                                    f"past here (next version {self.next_version})")
        if self.open is not None:
            self._close_open("aborted", "superseded by a new version before it was decided", now,
                             "superseded")
        version = max(self.next_version, min_version or 0)
        self.next_version = version + 1
        self.open = OpenVersion(version, epoch, step, sorted(self.members), now, now + self.version_timeout_s)
        self.handles.pinned = set(self.pinned_versions())
        self._dirty |= {"meta", "open"}
        return {"version": version, "quorum": list(self.open.quorum)}

    def _open(self, version: int) -> OpenVersion:
        o = self.open
        if o is None or o.version != version:
            state = ("committed" if version <= self.committed else "not open")
            raise FencedError(f"fleet {self.fleet}: version {version} is {state} (open: "
                              f"{o.version if o else 'none'}, committed: {self.committed})")
        return o

    def seal(self, epoch: int, version: int, digest: str, n_buckets: int, now: float) -> dict[str, Any]:
        self._fence(epoch)
        o = self._open(version)
        if not digest or n_buckets < 0:
            raise CoordinatorError(f"version {version}: seal needs a manifest digest and a bucket count")
        o.digest, o.n_buckets = digest, n_buckets
        o.deadline = now + self.version_timeout_s  # receivers get the whole timeout after the last bucket
        self._dirty.add("open")
        return self.decision(now)

    def precommit(self, epoch: int, rid: str, version: int, digest: Optional[str],
                  now: float) -> dict[str, Any]:
        """``rid`` staged and verified every bucket of ``version``."""
        self._fence(epoch)
        o = self.open
        if o is None or o.version != version or rid not in o.quorum:
            return self.decision(now)  # late or foreign: does not count toward this version
        if digest is not None and o.digest is not None and digest != o.digest:
            o.nacks[rid] = f"precommitted manifest digest {digest} differs from the sealed {o.digest}"
        else:
            o.precommits.add(rid)
        self._dirty.add("open")
        return self.decision(now)

    def nack(self, epoch: int, rid: str, version: int, reason: str, now: float) -> dict[str, Any]:
        self._fence(epoch)
        o = self.open
        if o is not None and o.version == version and rid in o.quorum:
            o.nacks[rid] = reason[:1000]
            o.precommits.discard(rid)
            self._dirty.add("open")
        return self.decision(now)

    def decision(self, now: float) -> dict[str, Any]:
        """What should happen to the open version now: pending, commit or abort (with why)."""
        o = self.open
        if o is None:
            return {"version": None, "decision": "none", "committed": self.committed}
        live = [r for r in o.quorum if r in self.members]
        ready = [r for r in live if r in o.precommits]
        failed = sorted(r for r in live if r in o.nacks)
        pending = [r for r in live if r not in o.precommits and r not in o.nacks]
        out: dict[str, Any] = {"version": o.version, "ready": len(ready), "live": len(live),
                               "pending": sorted(pending), "failed": failed, "committed": self.committed}
        sealed = o.digest is not None
        if self.policy == "all":
            if failed:
                return {**out, "decision": "abort", "kind": "nack", "reason": "rejected by " + ", ".join(
                    f"{r} ({o.nacks[r][:200]})" for r in failed)}
            if sealed and not pending:
                return {**out, "decision": "commit"}
        else:
            need = len(live) // 2 + 1 if live else 0
            if sealed and len(ready) >= need:
                return {**out, "decision": "commit"}
            if len(ready) + len(pending) < need:
                return {**out, "decision": "abort", "kind": "majority",
                        "reason": f"majority impossible: {len(ready)} ready, {len(failed)} failed "
                                  f"of {len(live)}"}
        if now > o.deadline:
            return {**out, "decision": "abort", "kind": "deadline",
                    "reason": f"quorum not met within {self.version_timeout_s:.1f}s"}
        return {**out, "decision": "pending"}

    def commit(self, epoch: int, version: int, now: float) -> dict[str, Any]:
        """Commit the open version; refused unless its quorum is met. Returns who gets the commit."""
        self._fence(epoch)
        if version == self.committed and self.open is None:
            return {"version": version, "ready": [], "stragglers": [], "failed": [], "released": [],
                    "repeat": True}
        o = self._open(version)
        if version <= self.committed:
            raise FencedError(f"version {version} is not newer than committed version {self.committed}")
        d = self.decision(now)  # commit wins over the deadline when the quorum is met
        if d["decision"] != "commit":
            raise CoordinatorError(f"version {version} cannot commit: "
                                   f"{d.get('reason', 'quorum not met yet')}")
        live = [r for r in o.quorum if r in self.members]
        ready = sorted(r for r in live if r in o.precommits)
        self.committed, self.committed_digest, self.committed_step = version, o.digest or "", o.step
        self._close_open("committed", "", now)
        released = self.handles.set_pinned(self.pinned_versions(), now)  # the previous version's
        return {"version": version, "ready": ready, "failed": d["failed"],
                "released": [h.key for h in released],
                "stragglers": sorted(r for r in live if r not in o.precommits and r not in o.nacks)}

    def abort(self, epoch: int, version: int, reason: str, now: float, kind: str = "publisher") -> bool:
        """Abort the open version (idempotent: False when it is no longer open)."""
        self._fence(epoch)
        if self.open is None or self.open.version != version:
            return False
        self._close_open("aborted", reason, now, kind)
        return True

    def _close_open(self, outcome: str, reason: str, now: float, kind: str = "") -> None:
        o = self.open
        assert o is not None
        self.open = None
        if outcome == "committed":
            self.counters["commits"] += 1
        else:
            self.counters["aborts"] += 1
            self.counters["quorum_failures"] += 1
            self.handles.drop_version(o.version)  # nobody will apply it: its handles are done
        self.handles.pinned = set(self.pinned_versions())
        entry = {"version": o.version, "outcome": outcome, "reason": reason[:300], "kind": kind, "at": now,
                 "ready": len(o.precommits), "quorum": len(o.quorum)}
        self.recent = (self.recent + [entry])[-RECENT:]
        self._dirty |= {"meta", "open"}

    def expire_orphan(self, now: float) -> Optional[dict[str, Any]]:
        """Abort an open version nobody decided long after its deadline (its publisher died)."""
        o = self.open
        if o is not None and now > o.deadline + self.version_timeout_s:
            self._close_open("aborted", "publisher never decided it (gone?)", now, "orphaned")
            return {"version": o.version}
        return None

    # ---------------------------------------------------------------- handles
    def post_handles(self, epoch: int, version: int, handles: list[tuple[str, str, str]], owner: str,
                     holders: list[str], now: float) -> int:
        """Post (key, name, sig) handles of ``version`` for ``holders``."""
        self._fence(epoch)
        for key, name, sig in handles:
            self.handles.post(key, name, version, owner, holders, now, sig)
        return len(handles)

    def ack(self, epoch: int, rid: str, version: int, now: float) -> list[Handle]:
        """``rid`` released ``version`` (applied *or* discarded it: a release says nothing about what
        runs, so live versions come only from registration and heartbeats)."""
        self._fence(epoch)
        return self.handles.ack_version(version, rid, now)

    def pinned_versions(self) -> list[int]:
        return [v for v in (self.committed, self.open.version if self.open else 0) if v]

    # ---------------------------------------------------------------- status
    def status(self, now: float) -> dict[str, Any]:
        members = []
        for m in sorted(self.members.values(), key=lambda m: m.rid):
            members.append({"rid": m.rid, "pid": m.pid, "host": m.host, "live_version": m.live_version,
                            "lag": max(self.committed - m.live_version, 0),
                            "heartbeat_age_s": round(max(now - m.last_heartbeat, 0.0), 3),
                            "registered_at": m.registered_at})
        o = self.open
        return {"fleet": self.fleet, "generation": self.generation, "epoch": self.epoch,
                "quorum_policy": self.policy, "committed": self.committed,
                "committed_step": self.committed_step, "next_version": self.next_version,
                "receivers": members,
                "open": None if o is None else {
                    **self.decision(now), "step": o.step, "quorum": list(o.quorum),
                    "age_s": round(now - o.began_at, 3)},
                "handles_active": len(self.handles), "counters": dict(self.counters),
                "recent": list(self.recent)}


def _check_rid(rid: Any) -> None:
    if not isinstance(rid, str) or not 0 < len(rid) <= 256:
        raise CoordinatorError(f"receiver id must be a string of 1-256 characters, got {rid!r:.80}")


__all__ = ["FleetState", "Member", "OpenVersion", "QUORUM_POLICIES"]
