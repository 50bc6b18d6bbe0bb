"""A busy-polling asyncio event loop, for a machine with a core to spare (``engine.busy_poll``).

Why: on a shared machine a causal-model step costs several times more after a few milliseconds
of anything else — sleeping, or spinning on other work alike — than back to back, and every numpy
call slows down then, the tiniest ones included; so it is not only the weights leaving the cache
but the core's state as a whole (on a shared VM, most likely other tenants on the same physical
core), and a short gap costs far less than a long one. On top of that, a sleeping loop has to be
woken from ``epoll_wait`` by the input thread. ``cadenza bench velocity`` (back to back vs idle
gaps vs keep-warm) and ``cadenza bench latency --busy-poll`` measure both; the figures are in
docs/benchmarks.md.

This loop never sleeps. Its selector polls with a zero timeout until the loop has something to
do, and between polls it calls the registered *pollers*: functions that drain an input (an rtmidi
queue) straight onto the loop and say whether they found anything. So input is read by the loop
thread itself — no input thread, no wake-up — and the engine runs the keep-warm scratch note
every 0.5 ms in the gaps (``engine.BUSY_KEEP_WARM_MS``), at the price of one core at 100 % for as
long as the service runs. That is the usual trade of low-latency systems (busy
polling in network stacks and trading engines); leave it off on a laptop on battery or a machine
whose cores the DAW and the synth need.

Other Python threads still get the interpreter: the loop lets go of the GIL in every poll, and
while it runs the interpreter's switch interval is shortened so that a thread that asked for it
gets it within half a millisecond, not five.
"""

from __future__ import annotations

import asyncio
import selectors
import sys
import time
from collections.abc import Callable

SWITCH_INTERVAL_S = 0.0005  # while spinning: how soon another Python thread gets the GIL

Poller = Callable[[], bool]


class SpinSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """The platform's selector, polled with a zero timeout until there is work."""

    def __init__(self) -> None:
        super().__init__()
        self.pollers: list[Poller] = []

    def select(self, timeout: float | None = None):
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            found = False
            for poll in tuple(self.pollers):
                if poll():
                    found = True
            events = super().select(0)
            if events or found or (end is not None and time.monotonic() >= end):
                return events


class SpinEventLoop(asyncio.SelectorEventLoop):
    """An event loop that never blocks; see the module docstring."""

    def __init__(self) -> None:
        super().__init__(SpinSelector())

    def run_forever(self) -> None:
        # While spinning, another Python thread that wants the GIL gets it within
        # SWITCH_INTERVAL_S (the interpreter's default is 5 ms).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        try:
            super().run_forever()
        finally:
            sys.setswitchinterval(interval)

    def add_poller(self, poll: Poller) -> None:
        """Call ``poll()`` (on the loop thread) between all other work; it returns whether it
        delivered anything."""
        self._selector.pollers.append(poll)

    def remove_poller(self, poll: Poller) -> None:
        pollers = self._selector.pollers
        if poll in pollers:
            pollers.remove(poll)


def spin_runner() -> asyncio.Runner:
    """An ``asyncio.Runner`` on a :class:`SpinEventLoop`."""
    return asyncio.Runner(loop_factory=SpinEventLoop)
