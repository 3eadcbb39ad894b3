"""Handles: transport-posted references (shm block names, CUDA-IPC handles) with holders and a TTL.

A publisher *posts* a handle for a version to the receivers expected to read it (its *holders*). The
handle then lives until one of two things happens:

- **every holder acked it** (a receiver acks all handles of a version when it releases that version):
  the TTL is cut short and the handle is released at once. One receiver's ack only ends that
  receiver's hold; the handle stays for the others. Handles of *pinned* versions (the committed and
  the open one: late joiners still read them) stay recorded without holders until unpinned, so the
  memory behind them is always on record.
- **its TTL passed** (``handle_ttl`` seconds after posting, or after the last renewal): it *expires*;
  the owner then frees the memory behind it (the shm transport unlinks the block) even though some
  holder never acked. A holder that still maps the memory keeps its mapping; only the name goes.

The owner renews the handles it still needs (those of the committed and the open version, which late
joiners read); a dead owner renews nothing, so its handles expire and a janitor frees them.

:class:`HandleTable` is pure bookkeeping (no I/O, time passed in), reused for every kind of handle.
:func:`sign_handle` / :func:`verify_handle` are the HMAC signing used when ``handle_token`` is set.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..errors import CoordinatorError


@dataclass
class Handle:
    key: str            # unique within the fleet, e.g. "12.3" (version 12, bucket 3)
    name: str           # the transport reference itself (shm block name, IPC handle)
    version: int
    owner: str          # "host:pid_start_pidns" of the process that owns the memory behind it
    holders: set[str] = field(default_factory=set)
    posted_at: float = 0.0
    expires_at: float = 0.0
    sig: str = ""       # HMAC of (name, owner) when handle_token is set

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "version": self.version, "owner": self.owner,
                "holders": sorted(self.holders), "posted_at": self.posted_at,
                "expires_at": self.expires_at, "sig": self.sig}

    @classmethod
    def from_dict(cls, d: Any) -> "Handle":
        """Rebuild from stored JSON, checking every field (the store is another process's output)."""
        if not isinstance(d, dict):
            raise CoordinatorError(f"stored handle is not an object: {d!r:.100}")
        try:
            h = cls(key=_typed(d, "key", str), name=_typed(d, "name", str), version=_typed(d, "version", int),
                    owner=_typed(d, "owner", str), holders=set(_typed(d, "holders", list)),
                    posted_at=float(_typed(d, "posted_at", (int, float))),
                    expires_at=float(_typed(d, "expires_at", (int, float))), sig=_typed(d, "sig", str))
        except (TypeError, ValueError) as exc:
            raise CoordinatorError(f"stored handle is malformed: {exc}") from None
        if not all(isinstance(x, str) for x in h.holders):
            raise CoordinatorError(f"stored handle {h.key!r}: holders must be strings")
        return h


def _typed(d: dict, key: str, tp: Any) -> Any:
    value = d.get(key)
    if not isinstance(value, tp) or isinstance(value, bool):
        raise ValueError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


class HandleTable:
    """Posted handles of one fleet: holders, acks, renewals and expiry. Pure; ``now`` is passed in.

    Every method that changes an entry records its key in :attr:`dirty`, so a persistent store can
    write exactly what changed. Counters (``posted``, ``acked``, ``expired``) count events.
    """

    def __init__(self, ttl_s: float):
        if not ttl_s > 0:
            raise CoordinatorError(f"handle TTL must be > 0 seconds, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)
        self.handles: dict[str, Handle] = {}
        self.pinned: set[int] = set()  # versions whose handles stay recorded without holders
        self.dirty: set[str] = set()
        self.posted = 0
        self.acked = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self.handles)

    def post(self, key: str, name: str, version: int, owner: str, holders: Iterable[str], now: float,
             sig: str = "") -> Optional[Handle]:
        """Post (or re-post, for a late joiner) a handle; its TTL starts now. No holders: nothing to track."""
        holders = set(holders)
        if not holders:
            return None
        h = self.handles.get(key)
        if h is None:
            h = Handle(key, name, version, owner, holders, now, now + self.ttl_s, sig)
            self.handles[key] = h
        else:
            if (h.name, h.version) != (name, version):
                raise CoordinatorError(f"handle {key!r} re-posted with another name or version")
            h.holders.update(holders)
            h.expires_at = max(h.expires_at, now + self.ttl_s)
        self.posted += 1
        self.dirty.add(key)
        return h

    def ack(self, key: str, rid: str, now: float) -> Optional[Handle]:
        """``rid`` is done with ``key``. Returns the handle if that was the last hold (it is released)."""
        h = self.handles.get(key)
        if h is None or rid not in h.holders:
            return None
        h.holders.discard(rid)
        self.acked += 1
        self.dirty.add(key)
        return self._release_if_idle(h, now)

    def _release_if_idle(self, h: Handle, now: float) -> Optional[Handle]:
        if h.holders or h.version in self.pinned:
            return None
        h.expires_at = min(h.expires_at, now)  # the last ack cuts the TTL to zero
        del self.handles[h.key]
        self.dirty.add(h.key)
        return h

    def set_pinned(self, versions: Iterable[int], now: float) -> list[Handle]:
        """Pin ``versions``; handles of versions no longer pinned and without holders are released."""
        self.pinned = set(versions)
        released = []
        for h in list(self.handles.values()):
            r = self._release_if_idle(h, now)
            if r is not None:
                released.append(r)
        return released

    def ack_version(self, version: int, rid: str, now: float) -> list[Handle]:
        """Ack every handle of ``version`` held by ``rid``; returns those released by it."""
        released = []
        for key in [k for k, h in self.handles.items() if h.version == version and rid in h.holders]:
            h = self.ack(key, rid, now)
            if h is not None:
                released.append(h)
        return released

    def forget_holder(self, rid: str, now: float) -> list[Handle]:
        """``rid`` went away: its holds end (not counted as acks). Returns handles released by it."""
        released = []
        for key, h in list(self.handles.items()):
            if rid in h.holders:
                h.holders.discard(rid)
                self.dirty.add(key)
                r = self._release_if_idle(h, now)
                if r is not None:
                    released.append(r)
        return released

    def renew(self, versions: Iterable[int], now: float) -> int:
        """Extend the TTL of every handle of ``versions`` (the owner still needs them)."""
        wanted = set(versions)
        n = 0
        for key, h in self.handles.items():
            if h.version in wanted and h.expires_at < now + self.ttl_s * 0.5:
                h.expires_at = now + self.ttl_s
                self.dirty.add(key)
                n += 1
        return n

    def expire(self, now: float, only: Optional[Any] = None) -> list[Handle]:
        """Remove and return handles whose TTL passed (``only(handle)`` may restrict which)."""
        out = []
        for key, h in list(self.handles.items()):
            if h.expires_at <= now and (only is None or only(h)):
                del self.handles[key]
                self.dirty.add(key)
                out.append(h)
        self.expired += len(out)
        return out

    def drop_version(self, version: int) -> list[Handle]:
        """Release every handle of ``version`` at once (it was aborted: nobody will read it again)."""
        out = [h for h in self.handles.values() if h.version == version]
        for h in out:
            del self.handles[h.key]
            self.dirty.add(h.key)
        return out

    def of_version(self, version: int) -> list[Handle]:
        return [h for h in self.handles.values() if h.version == version]

    def take_dirty(self) -> set[str]:
        out, self.dirty = self.dirty, set()
        return out


# ------------------------------------------------------------------------------------------------ HMAC
def sign_handle(key: str, *parts: Any) -> str:
    """HMAC-SHA256 (hex) of ``parts`` joined unambiguously, keyed with ``key`` (handle_token)."""
    msg = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return hmac.new(key.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def verify_handle(key: str, sig: Any, *parts: Any) -> bool:
    """Constant-time check of a handle signature; a missing or non-string signature fails."""
    if not isinstance(sig, str) or not sig:
        return False
    return hmac.compare_digest(sign_handle(key, *parts), sig)


__all__ = ["Handle", "HandleTable", "sign_handle", "verify_handle"]
