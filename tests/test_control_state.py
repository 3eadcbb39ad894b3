"""The coordinator state machine and the handle table: pure logic, every rule of the module docstrings."""

from __future__ import annotations

import json

import pytest

from hotweights_trainer.control.handles import HandleTable, sign_handle, verify_handle
from hotweights_trainer.control.state import FleetState
from hotweights_trainer.errors import CoordinatorError, FencedError


def fleet(n: int = 3, quorum: str = "all", **kw) -> tuple[FleetState, int]:
    s = FleetState("shm://t", quorum=quorum, heartbeat_ttl_s=kw.pop("ttl", 5.0), version_timeout_s=10.0, **kw)
    e = s.claim(0.0)
    for i in range(n):
        s.register(e, f"r{i}", 100 + i, "h", 0, 0.0)
    return s, e


def test_all_quorum_commits_only_when_every_member_precommitted():
    s, e = fleet(3)
    v = s.begin(e, 7, 1.0)["version"]
    assert v == 1
    assert s.seal(e, v, "d", 2, 1.0)["decision"] == "pending"
    assert s.precommit(e, "r0", v, "d", 1.1)["decision"] == "pending"
    assert s.precommit(e, "r1", v, "d", 1.1)["decision"] == "pending"
    with pytest.raises(CoordinatorError, match="cannot commit"):
        s.commit(e, v, 1.2)
    assert s.precommit(e, "r2", v, "d", 1.2)["decision"] == "commit"
    out = s.commit(e, v, 1.3)
    assert out["ready"] == ["r0", "r1", "r2"] and out["stragglers"] == []
    assert s.committed == 1 and s.committed_step == 7 and s.open is None and s.next_version == 2


def test_unsealed_version_never_commits():
    s, e = fleet(1)
    v = s.begin(e, None, 0.0)["version"]
    assert s.precommit(e, "r0", v, None, 0.1)["decision"] == "pending"  # no digest sealed yet
    assert s.seal(e, v, "d", 1, 0.2)["decision"] == "commit"


def test_one_nack_aborts_under_all():
    s, e = fleet(3)
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    s.precommit(e, "r0", v, "d", 0.1)
    d = s.nack(e, "r1", v, "ManifestMismatchError: w: shape", 0.1)
    assert d["decision"] == "abort" and d["kind"] == "nack" and "r1" in d["reason"]
    assert s.abort(e, v, d["reason"], 0.2, kind="nack")
    assert s.committed == 0 and s.open is None
    assert s.counters["quorum_failures"] == 1 and s.recent[-1]["kind"] == "nack"
    assert s.abort(e, v, "again", 0.3) is False  # idempotent


def test_precommit_with_a_different_digest_counts_as_a_rejection():
    s, e = fleet(1)
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "good", 1, 0.0)
    assert s.precommit(e, "r0", v, "other", 0.1)["decision"] == "abort"


def test_evicted_member_no_longer_counts_toward_quorum():
    s, e = fleet(3, ttl=2.0)
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    for r in ("r0", "r1"):
        s.heartbeat(e, r, 0, 1.5)
        s.precommit(e, r, v, "d", 1.5)
    assert s.decision(1.5)["decision"] == "pending"  # r2 still counts
    gone, _ = s.evict_expired(2.5)  # r2's last heartbeat was at 0.0
    assert gone == ["r2"] and s.counters["evictions"] == 1
    assert s.decision(2.5)["decision"] == "commit"
    assert s.commit(e, v, 2.6)["ready"] == ["r0", "r1"]
    assert s.heartbeat(e, "r2", 0, 3.0) is False  # it must register again


def test_leave_also_shrinks_the_live_quorum():
    s, e = fleet(2)
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    s.precommit(e, "r0", v, "d", 0.1)
    assert s.leave(e, "r1", 0.2)["decision"]["decision"] == "commit"


def test_majority_quorum_commits_with_more_than_half_and_reports_stragglers():
    s, e = fleet(5, quorum="majority")
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    for r in ("r0", "r1"):
        s.precommit(e, r, v, "d", 0.1)
    s.nack(e, "r2", v, "CorruptBucketError: x", 0.1)
    assert s.decision(0.1)["decision"] == "pending"  # 2 of 5 is no majority, but 3 is still possible
    s.precommit(e, "r3", v, "d", 0.2)
    assert s.decision(0.2)["decision"] == "commit"
    out = s.commit(e, v, 0.3)
    assert out["ready"] == ["r0", "r1", "r3"] and out["stragglers"] == ["r4"] and out["failed"] == ["r2"]


def test_majority_aborts_once_it_cannot_be_reached():
    s, e = fleet(3, quorum="majority")
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    s.nack(e, "r0", v, "x", 0.1)
    assert s.decision(0.1)["decision"] == "pending"
    d = s.nack(e, "r1", v, "x", 0.1)
    assert d["decision"] == "abort" and d["kind"] == "majority"


def test_deadline_aborts_but_a_met_quorum_still_commits_after_it():
    s, e = fleet(2)
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 1.0)  # the deadline starts at seal: 11.0
    s.precommit(e, "r0", v, "d", 2.0)
    assert s.decision(10.9)["decision"] == "pending"
    d = s.decision(11.1)
    assert d["decision"] == "abort" and d["kind"] == "deadline" and d["pending"] == ["r1"]
    s.precommit(e, "r1", v, "d", 11.2)
    assert s.commit(e, v, 11.3)["ready"] == ["r0", "r1"]


def test_fencing_stale_publisher_cannot_begin_or_commit():
    s, old = fleet(1)
    v = s.begin(old, None, 0.0)["version"]
    s.seal(old, v, "d", 1, 0.0)
    s.precommit(old, "r0", v, "d", 0.1)
    new = s.claim(0.2)  # a new publisher took over; the open version of the old one is aborted
    assert new == old + 1 and s.open is None and s.members == {}
    for call in (lambda: s.commit(old, v, 0.3), lambda: s.begin(old, None, 0.3),
                 lambda: s.register(old, "r0", 1, "h", 0, 0.3), lambda: s.heartbeat(old, "r0", 0, 0.3)):
        with pytest.raises(FencedError, match="stale"):
            call()
    assert s.begin(new, None, 0.4)["version"] == v + 1  # numbering continues; v is burnt


def test_nothing_commits_over_a_newer_version():
    s, e = fleet(0)
    v1 = s.begin(e, None, 0.0)["version"]
    v2 = s.begin(e, None, 0.1)["version"]  # v1 superseded before it was decided
    assert s.recent[-1] == {**s.recent[-1], "version": v1, "outcome": "aborted", "kind": "superseded"}
    s.seal(e, v2, "d", 1, 0.1)
    s.commit(e, v2, 0.2)
    with pytest.raises(FencedError):
        s.commit(e, v1, 0.3)
    assert s.commit(e, v2, 0.3).get("repeat")  # repeating the commit (a retried request) is harmless


def test_register_continues_numbering_above_a_receivers_live_version():
    s, e = fleet(0)
    out = s.register(e, "old", 1, "h", 41, 0.0)
    assert out["next_version"] == 42 and not out["catch_up"]
    assert s.begin(e, None, 0.1)["version"] == 42


def test_late_joiner_is_reported_behind_and_joins_the_next_quorum():
    s, e = fleet(1)
    v = s.begin(e, None, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    out = s.register(e, "late", 9, "h", 0, 0.1)  # joined while v was open: not in its quorum
    assert out["catch_up"] is False  # nothing committed yet
    s.precommit(e, "r0", v, "d", 0.2)
    s.precommit(e, "late", v, "d", 0.2)  # ignored: not in the quorum
    assert s.commit(e, v, 0.3)["ready"] == ["r0"]
    assert s.register(e, "late2", 10, "h", 0, 0.4)["catch_up"] is True
    assert "late" in s.begin(e, None, 0.5)["quorum"]


def test_round_trip_through_stored_pieces_and_validation():
    s, e = fleet(2)
    v = s.begin(e, 3, 0.0)["version"]
    s.seal(e, v, "d", 1, 0.0)
    s.post_handles(e, v, [(f"{v}.0", "hwt.t.1.1", "")], "h:1", ["r0", "r1"], 0.0)
    s.precommit(e, "r0", v, "d", 0.1)
    members = {r: m.to_dict() for r, m in s.members.items()}
    handles = {k: h.to_dict() for k, h in s.handles.handles.items()}
    pieces = json.loads(json.dumps([s.meta(), members, s.open.to_dict(), handles]))
    t = FleetState("shm://t")
    t.load(*pieces)
    assert t.status(1.0) == s.status(1.0)
    bad = json.loads(json.dumps(pieces))
    bad[1]["r0"]["pid"] = "x"
    with pytest.raises(CoordinatorError, match="pid"):
        FleetState("shm://t").load(*bad)
    bad = json.loads(json.dumps(pieces))
    bad[0]["next_version"] = 0
    with pytest.raises(CoordinatorError, match="inconsistent"):
        FleetState("shm://t").load(*bad)


def test_dirty_tracking_names_exactly_what_changed():
    s, e = fleet(2)
    s.take_dirty()
    s.heartbeat(e, "r1", 0, 1.0)
    assert s.take_dirty() == {"member:r1"}
    s.begin(e, None, 1.0)
    assert s.take_dirty() == {"meta", "open"}


# ------------------------------------------------------------------------------------------------ handles
def test_handle_ack_by_one_receiver_keeps_it_for_the_others():
    t = HandleTable(ttl_s=10)
    t.post("1.0", "hwt.x.1.1", 1, "h:1", ["a", "b"], now=0.0)
    assert t.ack("1.0", "a", now=1.0) is None
    assert "1.0" in t.handles and t.handles["1.0"].holders == {"b"}
    released = t.ack("1.0", "b", now=2.0)
    assert released is not None and released.expires_at == 2.0  # the last ack cut the TTL short
    assert len(t) == 0 and t.acked == 2 and t.expired == 0


def test_handle_expires_after_ttl_unless_renewed():
    t = HandleTable(ttl_s=10)
    t.post("1.0", "n1", 1, "o", ["a"], now=0.0)
    t.post("2.0", "n2", 2, "o", ["a"], now=0.0)
    assert t.expire(now=9.9) == []
    t.renew([2], now=9.9)  # version 2 is still needed (committed)
    gone = t.expire(now=10.0)
    assert [h.key for h in gone] == ["1.0"] and t.expired == 1 and list(t.handles) == ["2.0"]


def test_handle_forget_holder_and_version_helpers():
    t = HandleTable(ttl_s=5)
    t.post("3.0", "n", 3, "o", ["a", "b"], now=0.0)
    t.post("3.1", "m", 3, "o", ["a"], now=0.0)
    assert [h.key for h in t.ack_version(3, "a", 1.0)] == ["3.1"]
    assert [h.key for h in t.forget_holder("b", 1.0)] == ["3.0"]
    assert t.post("4.0", "n", 4, "o", [], now=0.0) is None  # nobody to hold it: nothing tracked
    t.post("5.0", "n", 5, "o", ["a"], now=0.0)
    assert [h.key for h in t.drop_version(5)] == ["5.0"] and len(t) == 0
    with pytest.raises(CoordinatorError):
        HandleTable(ttl_s=0)


def test_handle_reposted_for_late_joiner_adds_holder_and_checks_identity():
    t = HandleTable(ttl_s=5)
    t.post("1.0", "n", 1, "o", ["a"], now=0.0)
    t.post("1.0", "n", 1, "o", ["late"], now=3.0)
    assert t.handles["1.0"].holders == {"a", "late"} and t.handles["1.0"].expires_at == 8.0
    with pytest.raises(CoordinatorError, match="re-posted"):
        t.post("1.0", "other", 1, "o", ["x"], now=3.0)


def test_handle_signatures():
    sig = sign_handle("k", "shm://x", "hwt.x.1.1", "h:1")
    assert verify_handle("k", sig, "shm://x", "hwt.x.1.1", "h:1")
    assert not verify_handle("k", sig, "shm://x", "hwt.x.1.2", "h:1")
    assert not verify_handle("other", sig, "shm://x", "hwt.x.1.1", "h:1")
    assert not verify_handle("k", None, "shm://x") and not verify_handle("k", "", "shm://x")
