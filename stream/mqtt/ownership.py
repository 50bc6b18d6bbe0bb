"""Which daemon answers which session: weighted rendezvous hashing over the live daemons.

Every daemon publishes a retained status (``PREFIX/_daemon/ID/status``) with its capacity, and
the broker publishes its will (``offline``, retained) when it dies. Every daemon — and every
bridge — subscribes to all of them, so all agree on the live set without talking to each other,
and each computes a session's owner on its own::

    owner(session) = the live daemon d with the highest  -capacity(d) / ln(h(d, session))

where ``h`` is a hash of the pair mapped into (0, 1). That is rendezvous (highest random weight)
hashing with weights (Schindelhauer & Schomaker's logarithmic method): each daemon gets a share
of the sessions proportional to its capacity, and when a daemon joins or leaves, only the
sessions it wins or held move — the others keep their owner, their model context and their
sounding notes.

Why not MQTT v5 shared subscriptions (``$share/group/PREFIX/+/in``): the broker spreads
*messages* over the group, not sessions, so a note-on and its note-off could reach different
daemons, and a phrase's context would be split between models. A session is stateful; it needs
one owner for its lifetime.

The hash is BLAKE2b, not Python's ``hash()``: it must give the same answer in every process.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

ONLINE, DRAINING, OFFLINE = "online", "draining", "offline"


def score(daemon: str, session: str, capacity: float = 1.0) -> float:
    digest = hashlib.blake2b(f"{daemon}\x00{session}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 0.5) / 2.0**64  # in (0, 1)
    return -capacity / math.log(h)


def owner(session: str, daemons: Mapping[str, float]) -> str | None:
    """The daemon (id -> capacity) that answers ``session``; None when none is live."""
    best, best_score = None, -1.0
    for daemon, capacity in daemons.items():
        s = score(daemon, session, capacity)
        if s > best_score or (s == best_score and best is not None and daemon < best):
            best, best_score = daemon, s
    return best


@dataclass(frozen=True)
class Status:
    """A daemon's retained status: ``online`` with a capacity, ``draining`` or ``offline``;
    ``at`` is when it was published (Unix time), so a status left behind by a daemon that died
    while the broker was down (no will is sent for it) is recognised as stale."""

    state: str
    capacity: float = 1.0
    at: float | None = None

    def encode(self) -> bytes:
        if self.state == OFFLINE:
            return OFFLINE.encode()  # also what the will says: plain, so any client can read it
        doc = {"state": self.state, "capacity": self.capacity}
        if self.at is not None:
            doc["at"] = round(self.at, 3)
        return json.dumps(doc).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Status | None:
        """None for a payload that is not a status (counted by the caller, never fatal)."""
        if payload in (b"", b"offline"):
            return cls(OFFLINE)  # an empty retained message clears the status: gone
        if payload == b"online":
            return cls(ONLINE)
        try:
            doc = json.loads(payload)
            state = doc["state"]
            capacity = float(doc.get("capacity", 1.0))
            at = None if doc.get("at") is None else float(doc["at"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if state not in (ONLINE, DRAINING, OFFLINE) or not (0.0 < capacity < 1e6) or not math.isfinite(capacity):
            return None
        if at is not None and not math.isfinite(at):
            return None
        return cls(state, capacity, at)


class LiveSet:
    """The daemons that take sessions now, from their statuses as they arrive.

    With ``max_age`` (seconds), a daemon whose latest status was published longer ago than that
    is not live: daemons repeat their status every ``mqtt.status_interval_s`` and everyone drops
    one that stopped (3 intervals), which is how a status left retained by a daemon that died
    while the broker was down goes away. Every party applies the same rule to the same messages,
    so they agree but for the clocks' skew.
    """

    def __init__(self, max_age: float = 0.0) -> None:
        self.daemons: dict[str, float] = {}
        self.max_age = max_age
        self._at: dict[str, float] = {}

    def update(self, daemon: str, status: Status, now: float | None = None) -> bool:
        """Apply a daemon's status (``now``: Unix time); True if the live set changed."""
        if status.state == ONLINE:
            if self.max_age > 0 and now is not None:
                at = status.at if status.at is not None else now
                if now - at > self.max_age:  # a status left behind, not a daemon
                    self._at.pop(daemon, None)
                    return self.daemons.pop(daemon, None) is not None
                self._at[daemon] = at
            if self.daemons.get(daemon) == status.capacity:
                return False
            self.daemons[daemon] = status.capacity
            return True
        self._at.pop(daemon, None)
        return self.daemons.pop(daemon, None) is not None

    def expire(self, now: float, keep: str | None = None) -> list[str]:
        """Drop the daemons not heard from for ``max_age`` (never ``keep``, oneself); their ids."""
        if self.max_age <= 0:
            return []
        gone = [d for d, at in self._at.items() if d != keep and now - at > self.max_age]
        for d in gone:
            del self._at[d]
            self.daemons.pop(d, None)
        return gone

    def owner(self, session: str) -> str | None:
        return owner(session, self.daemons)

    def __len__(self) -> int:
        return len(self.daemons)


def daemon_of(topic: str) -> str | None:
    """``PREFIX/_daemon/ID/status`` -> ID."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[-3] == "_daemon" and parts[-1] == "status":
        return parts[-2]
    return None
