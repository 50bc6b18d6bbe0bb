"""The output scheduler: timestamped events go out on time, events due now go out at once.

Future events (continuation responses, lookahead output) sit in a heap; one loop timer is armed
for the earliest. Events carry a tag so a whole response can be cancelled (barge-in) or
transformed (ducking) before it plays. With ``realtime=False`` (file processing, ``demo
--fast``) nothing waits: events are handed on immediately, still in time order per call.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class OutputScheduler:
    def __init__(self, loop: asyncio.AbstractEventLoop, emit: Callable[[float, bytes, object], None], *, realtime: bool = True) -> None:
        self._loop = loop
        self._emit = emit  # emit(due_time, data, tag)
        self.realtime = realtime
        self._heap: list[tuple[float, int, bytes, object]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._cancelled: set[object] = set()
        self.late_s = 0.0  # worst lateness seen, for the stats

    def schedule(self, due: float, data: bytes, tag: object = None) -> None:
        if not self.realtime or due <= self._loop.time():
            if tag is None or tag not in self._cancelled:
                self._emit(due, data, tag)
            return
        heapq.heappush(self._heap, (due, next(self._seq), data, tag))
        if due < self._timer_at:
            self._arm(due)

    def cancel(self, tag: object) -> list[bytes]:
        """Drop every pending event with ``tag``; returns them (the caller may need their note-offs)."""
        self._cancelled.add(tag)
        dropped = [e[2] for e in self._heap if e[3] == tag]
        self._heap = [e for e in self._heap if e[3] != tag]
        heapq.heapify(self._heap)
        return dropped

    def pending(self, tag: object = None) -> int:
        return len(self._heap) if tag is None else sum(1 for e in self._heap if e[3] == tag)

    def flush_all(self) -> None:
        """Emit everything pending now (used on shutdown only after a cancel of musical events)."""
        while self._heap:
            due, _, data, tag = heapq.heappop(self._heap)
            self._emit(due, data, tag)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._loop.time()
        # epoll sleeps in whole milliseconds, so take what falls due within the next half one.
        while self._heap and self._heap[0][0] <= now + 0.0005:
            due, _, data, tag = heapq.heappop(self._heap)
            self.late_s = max(self.late_s, now - due)
            self._emit(due, data, tag)
        if self._heap:
            self._arm(self._heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
