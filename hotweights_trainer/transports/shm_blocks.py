"""Shared-memory block names, who owns a block, and reclaiming blocks whose owner is gone.

A publisher on ``shm://NAME`` keeps one POSIX shared-memory block per bucket. The name of a block
records its owner, so that any process can tell whether the owner still runs without asking it:

    hwt.NAME.PID_START_PIDNS.SEQ

    =======  ========================================================================
    NAME     the endpoint's name (may itself contain dots; the fields below are parsed
             from the right)
    PID      the owner's process id
    START    the owner's start time, field 22 of ``/proc/PID/stat`` (clock ticks since
             boot): a PID reused by another process has another start time
    PIDNS    inode of the owner's PID namespace (``/proc/self/ns/pid``): containers that
             share ``/dev/shm`` but not PIDs never judge each other's blocks
    SEQ      the block's number within its owner, from 1
    =======  ========================================================================

START and PIDNS are 0 where ``/proc`` is unavailable; such an owner is judged by its PID alone,
as are blocks named by earlier releases (``hwt.NAME.PID.SEQ``).

When blocks are freed:

* ``close()`` of the publisher unlinks its blocks; a publisher nobody closed is closed when the
  interpreter exits, and :func:`release_own_blocks` runs last at exit as a backstop (normal exit, an
  uncaught exception, ``sys.exit``);
* after SIGKILL or ``os._exit`` no code of the owner runs, so every hotweights process that starts
  (a publisher or receiver on any endpoint and transport, ``hotweights coord gc``) calls
  :func:`reclaim_dead_blocks`, which unlinks every block whose owner is gone. A receiver mapping such a
  block keeps its mapping: unlinking removes the name, not the memory in use.

A block of a live owner is never reclaimed. Owners are judged only in this process's PID namespace.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

try:
    import _posixshmem  # CPython's shm_open/shm_unlink, without multiprocessing's resource tracker
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

SHM_DIR = "/dev/shm"
PREFIX = "hwt."

_NAME = re.compile(r"^hwt\.(?P<endpoint>.+)\.(?P<pid>\d+)(?:_(?P<start>\d+)_(?P<ns>\d+))?\.(?P<seq>\d+)$")


@dataclass(frozen=True)
class Owner:
    """A process as it can be recognised later: PID, start time and PID namespace (0: unknown)."""

    pid: int
    start: int = 0
    ns: int = 0

    def tag(self) -> str:
        return f"{self.pid}_{self.start}_{self.ns}"


@dataclass(frozen=True)
class BlockName:
    endpoint: str
    owner: Owner
    seq: int
    legacy: bool = False
    """Named by an earlier release (no start time or namespace recorded)."""


def block_prefix(endpoint_name: str) -> str:
    """Every block of ``shm://endpoint_name`` starts with this."""
    return f"{PREFIX}{endpoint_name}."


def _stat(pid: int) -> Optional[tuple[bytes, int]]:
    """(state, start time in clock ticks since boot) of ``pid`` from ``/proc``; None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may contain spaces and ')'
        return fields[0], int(fields[19])  # fields[0] is field 3 of stat, fields[19] field 22
    except (OSError, IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_me: Optional[Owner] = None


def current_owner() -> Owner:
    """This process (recomputed after a fork: the child is another owner)."""
    global _me
    pid = os.getpid()
    if _me is None or _me.pid != pid:
        stat = _stat(pid)
        _me = Owner(pid, stat[1] if stat is not None else 0, _pid_namespace())
    return _me


def block_name(endpoint_name: str, seq: int) -> str:
    """The name of block ``seq`` of this process on ``shm://endpoint_name``."""
    return f"{block_prefix(endpoint_name)}{current_owner().tag()}.{seq}"


def parse_block_name(shm_name: str) -> Optional[BlockName]:
    """The parts of a block name, or None for anything that is not one."""
    m = _NAME.match(shm_name)
    if m is None:
        return None
    legacy = m.group("start") is None
    owner = Owner(int(m.group("pid")), 0 if legacy else int(m.group("start")), 0 if legacy else int(m.group("ns")))
    return BlockName(m.group("endpoint"), owner, int(m.group("seq")), legacy)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    return stat is None or stat[0] != b"Z"  # killed but not reaped yet: dead for our purposes


def owner_state(owner: Owner) -> str:
    """``alive``, ``dead``, or ``unknown`` (another PID namespace: not ours to judge)."""
    here = _pid_namespace()
    if owner.ns and here and owner.ns != here:
        return "unknown"
    if not pid_alive(owner.pid):
        return "dead"
    if owner.start:
        stat = _stat(owner.pid)
        if stat is not None and stat[1] != owner.start:
            return "dead"  # the PID was reused by a process started later
    return "alive"


def unlink_block(shm_name: str) -> bool:
    """Unlink one block by name; False when it was already gone or the name is not a block's."""
    if _posixshmem is None or parse_block_name(shm_name) is None:
        return False
    try:
        _posixshmem.shm_unlink("/" + shm_name)
        return True
    except FileNotFoundError:
        return False  # someone else removed it first
    except PermissionError:
        return False  # another user's block (/dev/shm is sticky): theirs to reclaim


def _listed(endpoint_name: Optional[str]) -> list[tuple[str, BlockName]]:
    if _posixshmem is None or not os.path.isdir(SHM_DIR):
        return []
    prefix = PREFIX if endpoint_name is None else block_prefix(endpoint_name)
    out = []
    try:
        entries = os.listdir(SHM_DIR)
    except OSError as exc:
        log.warning("cannot list %s to reclaim shared-memory blocks: %s", SHM_DIR, exc)
        return []
    for entry in entries:
        if entry.startswith(prefix):
            parsed = parse_block_name(entry)
            if parsed is not None and (endpoint_name is None or parsed.endpoint == endpoint_name):
                out.append((entry, parsed))
    return out


def reclaim_dead_blocks(endpoint_name: Optional[str] = None) -> list[str]:
    """Unlink the blocks whose owner process is gone: of ``shm://endpoint_name``, or of every endpoint
    (None). Returns the names removed. Each owner is looked up once."""
    states: dict[Owner, str] = {}
    removed = []
    for entry, parsed in _listed(endpoint_name):
        state = states.get(parsed.owner)
        if state is None:
            state = states[parsed.owner] = owner_state(parsed.owner)
        if state == "dead" and unlink_block(entry):
            removed.append(entry)
    if removed:
        log.info("reclaimed %d shared-memory block(s) of dead publishers%s", len(removed),
                 "" if endpoint_name is None else f" of shm://{endpoint_name}")
    return removed


def release_own_blocks() -> list[str]:
    """Unlink every block this process created and still has (run at interpreter exit)."""
    me = current_owner()
    removed = [entry for entry, parsed in _listed(None)
               if parsed.owner == me and not parsed.legacy and unlink_block(entry)]
    if removed:
        log.debug("unlinked %d shared-memory block(s) left open at exit", len(removed))
    return removed


def _at_exit() -> None:
    try:
        release_own_blocks()
    except OSError as exc:  # /dev/shm unreadable at exit: nothing left to report to but the log
        log.warning("could not release shared-memory blocks at exit: %s", exc)


# Registered at import, before any publisher exists: atexit runs handlers last-in first-out, so the
# publishers' own close (registered later) runs first and this only sweeps what it left behind.
atexit.register(_at_exit)

__all__ = ["SHM_DIR", "PREFIX", "Owner", "BlockName", "block_prefix", "block_name", "current_owner",
           "parse_block_name", "pid_alive", "owner_state", "unlink_block", "reclaim_dead_blocks",
           "release_own_blocks"]
