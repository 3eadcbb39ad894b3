"""Redis store: the fleet's state persisted in Redis, written only by the holder of the leader lease.

Keys (prefix ``hotweights:<fleet>:``)::

    generation   id of this state's lifetime (a new one only when a fleet starts from nothing)
    meta         JSON: epoch, committed version + digest + step, next_version, counters, recent outcomes
    open         JSON of the open version (absent when none)
    members      hash  rid -> JSON (pid, host, live version, last heartbeat)
    handles      hash  key -> JSON (name, version, owner, holders, expiry, signature)
    lease, fence_seq, fence   the leader lease (see :mod:`.lease`)

Every flush is one Lua script that first checks that ``generation`` is still the one this process
loaded (else Redis lost the state: **fail loudly**, never start again from version 0 behind the
fleet's back) and that ``fence`` still equals our lease token (else another coordinator took over:
:class:`~hotweights_trainer.errors.FencedError`), then applies every change. Either all of a
transition is stored or none of it. Everything read back is size-checked and schema-validated.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from ..errors import CoordinatorError, FencedError, NotLeaderError, missing_dependency
from .lease import Lease, LeaseKeeper

log = logging.getLogger(__name__)

MAX_VALUE_BYTES = 1 << 20  # one stored JSON value; anything larger is not ours

# KEYS: 1 generation, 2 fence, 3 meta, 4 open, 5 members, 6 handles
# ARGV: 1 expected generation ('' = initialise), 2 our fence token, then ops
_FLUSH = """
local g = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and g ~= ARGV[1] then
  return redis.error_reply('LOST generation ' .. tostring(g))
end
if ARGV[1] == '' and g then
  return redis.error_reply('EXISTS generation ' .. tostring(g))
end
local f = redis.call('GET', KEYS[2])
if f ~= ARGV[2] then
  return redis.error_reply('FENCED current fence ' .. tostring(f))
end
local i = 3
while i <= #ARGV do
  local op = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  if op == 'set' then redis.call('SET', k, ARGV[i + 2]); i = i + 3
  elseif op == 'del' then redis.call('DEL', k); i = i + 2
  elseif op == 'hset' then redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3]); i = i + 4
  elseif op == 'hdel' then redis.call('HDEL', k, ARGV[i + 2]); i = i + 3
  else return redis.error_reply('bad op ' .. tostring(op)) end
end
return 1
"""


def connect(url: str, timeout_s: float) -> Any:
    """A redis-py client with deadlines on every socket operation (a dead Redis never hangs us)."""
    try:
        import redis
    except ImportError as exc:
        raise missing_dependency("redis", "redis") from exc
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 5.0),
                                decode_responses=True, health_check_interval=0)


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _loads(raw: Any, what: str) -> Any:
    if not isinstance(raw, str) or len(raw) > MAX_VALUE_BYTES:
        raise CoordinatorError(f"Redis value {what} is missing, not text or larger than "
                               f"{MAX_VALUE_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CoordinatorError(f"Redis value {what} is not valid JSON: {exc}") from None


class RedisStore:
    kind = "redis"

    def __init__(self, fleet: str, url: str, *, lease_ms: int, timeout_s: float, holder: dict[str, Any],
                 keep_alive: bool = True):
        self.fleet = fleet
        self.url = url
        self._r = connect(url, timeout_s)
        self.prefix = f"hotweights:{fleet}:"
        p = self.prefix
        self._keys = [p + "generation", p + "fence", p + "meta", p + "open", p + "members", p + "handles"]
        self.lease = Lease(self._r, p, holder, lease_ms, fleet)
        self._flush = self._r.register_script(_FLUSH)
        self._generation: Optional[str] = None  # what we loaded or created; '' before that
        self._keeper = LeaseKeeper(self.lease) if keep_alive else None

    # ---------------------------------------------------------------- leadership
    def ensure_leader(self) -> bool:
        try:
            if self.lease.valid():
                return False
            if self.lease.token and self.lease.renew():
                return False  # still ours: nobody could have written meanwhile
            if self.lease.try_acquire():
                return True
            holder = self.lease.current_holder()
        except redis_errors() as exc:
            raise CoordinatorError(f"Redis at {self.url} is unreachable: {exc}") from None
        endpoint = holder.get("endpoint") if isinstance(holder, dict) else None
        raise NotLeaderError(f"fleet {self.fleet} is led by another coordinator ({_dumps(holder)[:300]})",
                             leader=endpoint if isinstance(endpoint, str) else None)

    def holds_lease(self) -> bool:
        return self.lease.valid()

    def leader_info(self) -> dict[str, Any]:
        try:
            holder = self.lease.current_holder()
            fence = self._r.get(self.lease.fence_key)
        except redis_errors() as exc:
            return {"store": "redis", "error": str(exc)}
        return {"store": "redis", "leader": holder, "this_process_token": self.lease.token,
                "fence": int(fence) if fence and fence.isdigit() else None}

    # ---------------------------------------------------------------- state
    def load(self) -> Optional[tuple[Any, dict, Any, dict]]:
        try:
            pipe = self._r.pipeline(transaction=True)
            for key in self._keys[0], self._keys[2], self._keys[3]:
                pipe.get(key)
            pipe.hgetall(self._keys[4])
            pipe.hgetall(self._keys[5])
            generation, meta, open_, members, handles = pipe.execute()
        except redis_errors() as exc:
            raise CoordinatorError(f"Redis at {self.url} is unreachable: {exc}") from None
        if generation is None:
            if self._generation:
                raise self._lost()
            return None
        meta_d = _loads(meta, "meta")
        if not isinstance(meta_d, dict) or meta_d.get("generation") != generation:
            raise CoordinatorError(f"Redis state of fleet {self.fleet} is inconsistent (meta does not match "
                                   f"generation {generation!r}); refusing to use it")
        if self._generation and generation != self._generation:
            log.warning("fleet %s: Redis holds a new state generation %s (was %s); following it", self.fleet,
                        generation, self._generation)
        self._generation = generation
        return (meta_d, {k: _loads(v, f"members[{k!r}]") for k, v in members.items()},
                None if open_ is None else _loads(open_, "open"),
                {k: _loads(v, f"handles[{k!r}]") for k, v in handles.items()})

    def _lost(self) -> CoordinatorError:
        return CoordinatorError(
            f"Redis at {self.url} no longer holds the state of fleet {self.fleet} (generation "
            f"{self._generation} is gone): it restarted without persistence or was flushed. Refusing to "
            f"continue from an empty state; receivers keep serving their committed version. Restart this "
            f"process to start a new state generation, or enable Redis persistence (appendonly).")

    def flush(self, state: Any, dirty: set[str]) -> None:
        ops: list[Any] = []
        initial = not self._generation
        if initial:
            ops += ["set", 1, state.generation]
        for item in sorted(dirty):
            kind, _, name = item.partition(":")
            if kind == "meta":
                ops += ["set", 3, _dumps(state.meta())]
            elif kind == "open":
                ops += ["del", 4] if state.open is None else ["set", 4, _dumps(state.open.to_dict())]
            elif kind == "member":
                m = state.members.get(name)
                ops += ["hdel", 5, name] if m is None else ["hset", 5, name, _dumps(m.to_dict())]
            elif kind == "handle":
                h = state.handles.handles.get(name)
                ops += ["hdel", 6, name] if h is None else ["hset", 6, name, _dumps(h.to_dict())]
        if initial and "meta" not in dirty:
            ops += ["set", 3, _dumps(state.meta())]
        try:
            import redis

            self._flush(keys=self._keys, args=[self._generation or "", self.lease.token, *ops])
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            if text.startswith("LOST"):
                self.lease.drop("state lost")
                raise self._lost() from None
            if text.startswith("FENCED"):
                self.lease.drop(text)
                raise FencedError(f"fleet {self.fleet}: write refused, another coordinator holds the fence "
                                  f"({text}); this one (token {self.lease.token}) stepped down") from None
            if text.startswith("EXISTS"):
                raise CoordinatorError(f"fleet {self.fleet}: state appeared in Redis while initialising "
                                       f"({text}); retry") from None
            raise CoordinatorError(f"Redis refused a state write for fleet {self.fleet}: {text}") from None
        except redis_errors() as exc:
            raise CoordinatorError(f"Redis at {self.url} is unreachable: {exc}") from None
        if initial:
            self._generation = state.generation

    def close(self, release: bool = True) -> None:
        if self._keeper is not None:
            self._keeper.stop()
        if release:
            try:
                self.lease.release()
            except redis_errors() as exc:
                log.info("could not release the lease of %s (Redis unreachable: %s); it expires by itself",
                         self.fleet, exc)
        self._r.close()


def read_state(url: str, fleet: str, timeout_s: float) -> Optional[tuple[Any, dict, Any, dict, dict]]:
    """Read a fleet's stored state without taking the lease (for status); None when there is none."""
    store = RedisStore(fleet, url, lease_ms=1000, timeout_s=timeout_s, holder={"reader": True},
                       keep_alive=False)
    try:
        data = store.load()
        return None if data is None else (*data, store.leader_info())
    finally:
        store.close(release=False)


__all__ = ["RedisStore", "connect", "read_state", "MAX_VALUE_BYTES"]
