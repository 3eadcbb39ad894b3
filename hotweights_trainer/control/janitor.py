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
import socket
from typing import Optional

from ..config import SyncConfig
from ..transports.endpoint import parse_endpoint
from ..transports.shm_blocks import (Owner, block_prefix, current_owner, owner_state, reclaim_dead_blocks,
                                     unlink_block)
from .handles import Handle, verify_handle

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def owner_tag() -> str:
    """``HOST:PID_START_PIDNS`` of this process: its identity survives a reuse of its PID."""
    return f"{HOST}:{current_owner().tag()}"


def _local_owner(owner: str) -> Optional[Owner]:
    """The owner behind a tag written on this host, or None (another host, or not a tag)."""
    host, _, ident = owner.rpartition(":")
    if host != HOST:
        return None
    if ident.isdigit():  # written by an earlier release: the PID alone
        return Owner(int(ident))
    parts = ident.split("_")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return Owner(*(int(p) for p in parts))


def owner_is_dead(h: Handle) -> bool:
    """True only for owners on this host whose process no longer exists (others: we cannot know)."""
    owner = _local_owner(h.owner)
    return owner is not None and owner_state(owner) == "dead"


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
        removed += reclaim_dead_blocks(ep.name)  # the dead owner's free pool: blocks with no handle posted
    if removed:
        log.info("fleet %s: freed %d shared-memory block(s) of dead publishers after their handles expired",
                 fleet, len(removed))
    return removed


__all__ = ["owner_tag", "owner_is_dead", "free_handles", "handle_trusted", "HOST"]
