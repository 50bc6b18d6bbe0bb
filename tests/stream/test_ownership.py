"""Rendezvous ownership and daemon statuses, without a broker."""

from __future__ import annotations

from collections import Counter

from cadenza.stream.mqtt.ownership import OFFLINE, ONLINE, LiveSet, Status, daemon_of, owner

SESSIONS = [f"session-{i}" for i in range(3000)]


def test_shares_follow_capacity_and_a_join_moves_only_the_newcomers_share():
    two = {"a": 1.0, "b": 1.0}
    before = {s: owner(s, two) for s in SESSIONS}
    share = Counter(before.values())
    assert abs(share["a"] - 1500) < 150  # about half each
    after = {s: owner(s, {**two, "c": 2.0}) for s in SESSIONS}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "c" for s in moved)  # nothing moves between a and b
    assert abs(len(moved) / len(SESSIONS) - 0.5) < 0.05  # c has half the capacity, so half the sessions
    gone = {s: owner(s, {"a": 1.0, "c": 2.0}) for s in SESSIONS}  # b leaves
    assert all(gone[s] == after[s] for s in SESSIONS if after[s] != "b")  # only b's sessions move


def test_owner_is_the_same_in_every_process_and_none_without_daemons():
    assert owner("alice", {"d1": 1.0, "d2": 1.0}) == owner("alice", {"d2": 1.0, "d1": 1.0})
    assert owner("alice", {}) is None
    # BLAKE2b, not hash(): a fixed answer (PYTHONHASHSEED would change Python's own hash)
    assert owner("alice", {"d1": 1.0, "d2": 1.0}) == owner("alice", dict([("d1", 1.0), ("d2", 1.0)]))


def test_status_round_trip_and_junk():
    s = Status(ONLINE, 2.0, 1_000.0)
    assert Status.decode(s.encode()) == s
    assert Status.decode(b"offline") == Status(OFFLINE) and Status.decode(b"") == Status(OFFLINE)
    assert Status.decode(b"online") == Status(ONLINE)
    for junk in (
        b"\xff\x00",
        b"{}",
        b'{"state": "bored"}',
        b'{"state": "online", "capacity": -1}',
        b"[1]",
        b'{"state": "online", "at": "x"}',
    ):
        assert Status.decode(junk) is None, junk
    assert daemon_of("cadenza/_daemon/d1/status") == "d1" and daemon_of("cadenza/alice/in") is None


def test_stale_and_silent_daemons_are_not_live():
    live = LiveSet(max_age=30.0)
    assert live.update("old", Status(ONLINE, 1.0, 0.0), now=1000.0) is False  # left behind long ago
    assert live.update("d1", Status(ONLINE, 1.0, 990.0), now=1000.0) is True
    assert live.update("d2", Status(ONLINE, 1.0, 999.0), now=1000.0) is True
    assert live.expire(1015.0) == [] and len(live) == 2
    assert live.update("d2", Status(ONLINE, 1.0, 1024.0), now=1025.0) is False  # repeated: same set
    assert live.expire(1040.0, keep="d1") == []  # never oneself
    assert live.expire(1040.0) == ["d1"] and list(live.daemons) == ["d2"]
    assert live.update("d2", Status(OFFLINE), now=1041.0) is True and len(live) == 0
