"""The busy-polling event loop (``engine.busy_poll``): pollers feed the loop, and everything an
ordinary loop does (timers, other threads' callbacks, executors) still works while it spins."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from cadenza.stream.spin import SWITCH_INTERVAL_S, SpinEventLoop, spin_runner


def test_pollers_feed_the_loop_and_can_be_removed():
    async def main():
        loop = asyncio.get_running_loop()
        assert isinstance(loop, SpinEventLoop)
        queue = list(range(5))
        got: list[int] = []
        calls = 0
        arrived = asyncio.Event()

        def poll() -> bool:
            nonlocal calls
            calls += 1
            if not queue:
                return False
            got.append(queue.pop(0))  # on the loop thread, like a MIDI input drained there
            arrived.set()
            return True

        loop.add_poller(poll)
        while len(got) < 5:
            await asyncio.wait_for(arrived.wait(), 5)
            arrived.clear()
        loop.remove_poller(poll)
        before = calls
        await asyncio.sleep(0.02)
        loop.remove_poller(poll)  # twice is fine
        return got, before, calls

    with spin_runner() as runner:
        got, before, after = runner.run(main())
    assert got == [0, 1, 2, 3, 4]
    assert after == before  # not called once removed


def test_timers_threads_and_executors_work_while_spinning():
    async def main():
        loop = asyncio.get_running_loop()
        assert sys.getswitchinterval() <= SWITCH_INTERVAL_S  # other threads get the GIL soon
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        slept = time.monotonic() - t0
        # a callback from another thread wakes the spinning loop
        fut = loop.create_future()
        threading.Timer(0.02, lambda: loop.call_soon_threadsafe(fut.set_result, "woken")).start()
        woken = await asyncio.wait_for(fut, 5)
        # a thread doing Python work gets the interpreter while the loop spins
        total = await asyncio.wait_for(asyncio.to_thread(lambda: sum(range(200_000))), 10)
        return slept, woken, total

    interval = sys.getswitchinterval()
    with spin_runner() as runner:
        slept, woken, total = runner.run(main())
    assert slept >= 0.05
    assert woken == "woken"
    assert total == sum(range(200_000))
    assert sys.getswitchinterval() == interval  # restored
