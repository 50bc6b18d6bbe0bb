"""Sources that are not ports: a file replayed into the engine (its output is recorded by
:class:`cadenza.stream.sinks.record.Recorder`).

``FileSource`` plays timed raw messages into the engine exactly as a port would — in real time,
stamped on arrival — or, with ``realtime=False``, as fast as the engine takes them, each stamped
with its time in the file so the models see the music's own timing.
"""

from __future__ import annotations

import asyncio
import time


class FileSource:
    def __init__(self, events: list[tuple[float, bytes]], *, realtime: bool = True, source: int = 0) -> None:
        self.events = sorted(events, key=lambda e: e[0])
        self.realtime = realtime
        self.source = source

    async def play(self, engine) -> float:
        """Feed every event; return the music time at which the file ended."""
        loop = asyncio.get_running_loop()
        if self.realtime:
            t0 = loop.time() + 0.05
            for t, data in self.events:
                delay = t0 + t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                engine.deliver_now(time.monotonic(), data, source=self.source)
            return loop.time()
        # Fast: offset music time so it never runs behind the engine's clock (timers and
        # latency figures stay meaningful), and let each note be answered before the next.
        base = loop.time()
        for t, data in self.events:
            engine.deliver_now(time.monotonic(), data, source=self.source, music_t=base + t)
            if data[0] & 0xF0 == 0x90:
                await engine.drain()
        await engine.drain()
        return base + (self.events[-1][0] if self.events else 0.0)
