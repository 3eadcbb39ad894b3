"""The coordinator's request/reply protocol over TCP (``coord_backend=tcp``).

Frames are the length-prefixed JSON of :mod:`hotweights_trainer.wire.messages` (size-limited,
nothing pickled), with this module's schemas instead of the data-plane ones::

    request  {"op": "call", "id": N, "fleet": "shm://policy", "method": "commit",
              "args": {...}, "token": "..."}
    reply    {"op": "reply", "id": N, "ok": true, "result": ...}
    reply    {"op": "reply", "id": N, "ok": false, "error_type": "FencedError", "error": "...",
              "leader": "tcp://host:port" | null}

Every method's arguments are type-checked here before the coordinator sees them. Every method except
``status`` mutates state and needs the shared ``coord_token``; the server compares it in constant
time and counts refusals.
"""

from __future__ import annotations

from typing import Any

from ..errors import (AuthError, ConfigError, CoordinatorError, FencedError, HotweightsError, NotLeaderError,
                      StaleVersionError, WireFormatError)

_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

METHODS: dict[str, dict[str, Any]] = {
    "claim": {"owner": dict},
    "register": {"epoch": int, "rid": str, "pid": int, "host": str, "live_version": int},
    "heartbeat": {"epoch": int, "rid": str, "live_version": int},
    "leave": {"epoch": int, "rid": str},
    "begin": {"epoch": int, "step": _OPT_INT, "min_version": _OPT_INT},
    "seal": {"epoch": int, "version": int, "digest": str, "n_buckets": int},
    "precommit": {"epoch": int, "rid": str, "version": int, "digest": _OPT_STR},
    "nack": {"epoch": int, "rid": str, "version": int, "reason": str},
    "commit": {"epoch": int, "version": int},
    "abort": {"epoch": int, "version": int, "reason": str, "kind": str},
    "post_handles": {"epoch": int, "version": int, "handles": list, "owner": str, "holders": list},
    "ack": {"epoch": int, "rid": str, "version": int},
    "sweep": {"epoch": int},
    "status": {},
}
READ_ONLY = frozenset({"status"})

# Errors a server may report, re-raised on the client with their own type.
ERRORS: dict[str, type[HotweightsError]] = {
    "AuthError": AuthError, "FencedError": FencedError, "StaleVersionError": StaleVersionError,
    "NotLeaderError": NotLeaderError,
    "CoordinatorError": CoordinatorError, "WireFormatError": WireFormatError, "ConfigError": ConfigError,
}

MAX_FLEET_LEN = 200


def _is(value: Any, tp: Any) -> bool:
    types = tp if isinstance(tp, tuple) else (tp,)
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def check_request(msg: Any) -> dict[str, Any]:
    """Validate a request frame completely (envelope and arguments); raises WireFormatError."""
    if not isinstance(msg, dict) or msg.get("op") != "call":
        raise WireFormatError("coordinator request must be an object with op 'call'")
    if not _is(msg.get("id"), int):
        raise WireFormatError("coordinator request: id must be an integer")
    fleet = msg.get("fleet")
    if not isinstance(fleet, str) or not 0 < len(fleet) <= MAX_FLEET_LEN:
        raise WireFormatError(f"coordinator request: fleet must be a string of 1-{MAX_FLEET_LEN} characters")
    method = msg.get("method")
    schema = METHODS.get(method) if isinstance(method, str) else None
    if schema is None:
        raise WireFormatError(f"coordinator request: unknown method {method!r:.60}")
    args = msg.get("args")
    if not isinstance(args, dict) or set(args) != set(schema):
        raise WireFormatError(f"coordinator request {method}: args must have exactly {sorted(schema)}")
    for key, tp in schema.items():
        if not _is(args[key], tp):
            raise WireFormatError(f"coordinator request {method}: {key!r} has the wrong type")
        if _is(args[key], int) and args[key] < 0:
            raise WireFormatError(f"coordinator request {method}: {key!r} must be >= 0")
    if "token" in msg and not isinstance(msg["token"], str):
        raise WireFormatError("coordinator request: token must be a string")
    return msg


def check_reply(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict) or msg.get("op") != "reply" or not _is(msg.get("id"), int) \
            or not isinstance(msg.get("ok"), bool):
        raise WireFormatError("coordinator reply must be an object with op 'reply', an integer id and ok")
    if not msg["ok"] and not (isinstance(msg.get("error"), str) and isinstance(msg.get("error_type"), str)):
        raise WireFormatError("coordinator error reply needs error and error_type strings")
    return msg


def error_reply(rid: int, exc: HotweightsError) -> dict[str, Any]:
    name = type(exc).__name__
    if name not in ERRORS:
        name = "CoordinatorError"
    return {"op": "reply", "id": rid, "ok": False, "error_type": name, "error": str(exc)[:4000],
            "leader": getattr(exc, "leader", None)}


def raise_reply(msg: dict[str, Any]) -> None:
    etype = ERRORS.get(msg["error_type"], CoordinatorError)
    if etype is NotLeaderError:
        leader = msg.get("leader")
        raise NotLeaderError(msg["error"], leader=leader if isinstance(leader, str) else None)
    raise etype(msg["error"])


__all__ = ["METHODS", "READ_ONLY", "ERRORS", "check_request", "check_reply", "error_reply", "raise_reply"]
