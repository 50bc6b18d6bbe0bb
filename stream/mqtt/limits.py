"""Per-session input limits: a flooding session loses its own excess, counted; others keep theirs.

Each session has two token buckets — messages per second and bytes per second, each with a
burst — checked before anything reaches the engine. A payload the byte bucket cannot cover is
dropped whole, unparsed, so a flood costs the loop almost nothing; a payload that would take
more messages than the message bucket holds keeps what fits. When a session starts being
throttled, the notes it has sounding are released (note-offs handed to the engine like played
ones), since the note-offs it sends next may be among what is dropped: a flood never leaves a
note stuck at its synth, and never touches another session's notes.
"""

from __future__ import annotations

from cadenza.buffers.ledger import NoteLedger


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full. ``rate <= 0`` is no limit."""

    __slots__ = ("rate", "burst", "tokens", "t")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.t = now

    def refill(self, now: float) -> float:
        if now > self.t:  # stamps may come a hair out of order (arrival vs. creation)
            if self.rate > 0:
                self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
        return self.tokens if self.rate > 0 else float("inf")

    def take(self, n: float) -> None:
        if self.rate > 0:
            self.tokens -= n


class SessionGate:
    """One session's limits and the notes it has sounding (as played, before the engine)."""

    def __init__(self, msgs_per_s: float, burst_msgs: int, bytes_per_s: float, burst_bytes: int, now: float) -> None:
        self.msgs = TokenBucket(msgs_per_s, burst_msgs, now)
        self.bytes = TokenBucket(bytes_per_s, burst_bytes, now)
        self.held = NoteLedger()
        self.throttled = False

    def admit_payload(self, size: int, now: float) -> bool:
        """Whether a payload of ``size`` bytes may be parsed at all."""
        if self.bytes.refill(now) < size:
            return False
        self.bytes.take(size)
        return True

    def admit_messages(self, n: int, now: float) -> int:
        """How many of the next ``n`` messages may pass."""
        allowed = min(n, int(self.msgs.refill(now))) if self.msgs.rate > 0 else n
        self.msgs.take(allowed)
        return allowed

    def passed(self, data: bytes) -> None:
        self.held.track(data)
        self.throttled = False

    def throttle(self) -> list[bytes]:
        """The session goes over its limit: the note-offs owed for what it has sounding (only
        once per stretch of throttling)."""
        if self.throttled:
            return []
        self.throttled = True
        return self.held.release_all()
