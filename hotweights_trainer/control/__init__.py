"""Control plane: which version a fleet runs, who is in it, and when a version may commit.

A *fleet* is one publisher endpoint and its receivers. Its coordinator runs one state machine
(:mod:`.state`, documented there): registration, heartbeats and eviction, begin / seal / precommit /
commit-or-abort with an ``all`` or ``majority`` quorum, fencing of stale publishers, late-join
catch-up, and the handle table (:mod:`.handles`: posted transport references with holders, acks and
a TTL).

Receivers speak only to their publisher (over the transport's control channel); the publisher relays
each event to the coordinator and acts on its answers, so the data path stays one hop. Where the
coordinator and its state live is the backend (:mod:`.session`):

==========  ================================================================================
embedded    in the publisher process, state in memory (default; nothing to start)
redis       in the publisher process, state in Redis under a leader lease (:mod:`.lease`,
            :mod:`.redis_store`); survives publisher restarts, fails loudly if Redis loses it
tcp         in ``hotweights coord serve`` (:mod:`.server`, :mod:`.client`), optionally several
            of them sharing Redis with leader election and failover
==========  ================================================================================
"""

from .handles import Handle, HandleTable, sign_handle, verify_handle
from .session import FleetSession, open_session
from .state import FleetState

__all__ = ["FleetState", "Handle", "HandleTable", "FleetSession", "open_session", "sign_handle",
           "verify_handle"]
