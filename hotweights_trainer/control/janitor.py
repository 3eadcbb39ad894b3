"""Freeing the memory behind expired handles whose owner is gone (the publisher was SIGKILLed).

A live owner frees its own expired handles (the publisher destroys the shm block). When the owner is
dead, nobody renews its handles, they expire, and whichever coordinator sweeps the fleet frees them
here: for ``shm://NAME`` fleets it unlinks the named blocks of dead local owners, then every other
block of those dead publishers (their free pool had no handle posted). With ``handle_token`` set, a
stored handle record is trusted only with a valid signature, so a forged record cannot make the
janitor unlink anything.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from ..config import SyncConfig
from ..transports.endpoint import parse_endpoint
from .handles import Handle, verify_handle

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def owner_tag(pid: Optional[int] = None) -> str:
    return f"{HOST}:{os.getpid() if pid is None else pid}"


def _local_pid(owner: str) -> Optional[int]:
    host, _, pid = owner.rpartition(":")
    return int(pid) if host == HOST and pid.isdigit() else None


def owner_is_dead(h: Handle) -> bool:
    """True only for owners on this host whose process no longer exists (others: we cannot know)."""
    pid = _local_pid(h.owner)
    if pid is None:
        return False
    from ..transports.shm import _pid_alive

    return not _pid_alive(pid)


def handle_trusted(h: Handle, fleet: str, config: SyncConfig) -> bool:
    if config.handle_token is None:
        return True
    return verify_handle(config.handle_token, h.sig, fleet, h.name, h.owner)


def free_handles(fleet: str, handles: list[Handle], config: SyncConfig) -> list[str]:
    """Free the memory behind expired handles of dead local owners; returns what was removed."""
    try:
        ep = parse_endpoint(fleet)
    except ValueError:
        return []
    if ep.scheme != "shm" or not handles:
        return []
    from ..transports.shm import block_prefix, cleanup_stale_blocks, unlink_block

    removed = []
    dead_owner = False
    for h in handles:
        if not owner_is_dead(h):
            continue
        if not handle_trusted(h, fleet, config):
            log.warning("fleet %s: handle %s has no valid signature; not touching %r", fleet, h.key, h.name)
            continue
        dead_owner = True
        if h.name.startswith(block_prefix(ep.name)) and unlink_block(h.name):
            removed.append(h.name)
    if dead_owner:
        removed += cleanup_stale_blocks(ep.name)  # the dead owner's free pool: blocks with no handle posted
    if removed:
        log.info("fleet %s: freed %d shared-memory block(s) of dead publishers after their handles expired",
                 fleet, len(removed))
    return removed


__all__ = ["owner_tag", "owner_is_dead", "free_handles", "handle_trusted", "HOST"]
