"""Sources that are not ports: a file replayed into the engine, and a recorder of its output.

``FileSource`` plays timed raw messages into the engine exactly as a port would — in real time,
stamped on arrival — or, with ``realtime=False``, as fast as the engine takes them, each stamped
with its time in the file so the models see the music's own timing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from cadenza.midifile import Performance


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


@dataclass
class Recorder:
    """An emit hook that keeps everything the engine sent, with music time and tag."""

    events: list[tuple[float, bytes, object]] = field(default_factory=list)

    def __call__(self, t: float, data: bytes, tag: object) -> None:
        self.events.append((t, data, tag))

    def performer_velocities(self) -> list[int]:
        """Velocities of the performer's notes as they went out, in order."""
        return [d[2] for _, d, tag in self.events if tag is None and d[0] & 0xF0 == 0x90 and d[2] > 0]

    def timed(self, *, tags=None, origin: float = 0.0) -> list[tuple[float, bytes]]:
        """(seconds from ``origin``, bytes) of the channel messages with the given tags (None = all)."""
        out = []
        for t, d, tag in self.events:
            if d[0] >= 0xF0:
                continue
            if tags is not None and tag not in tags:
                continue
            out.append((max(0.0, t - origin), d))
        return out


def events_to_performance(events: list[tuple[float, bytes]]) -> Performance:
    """Notes and sustain pedal from timed raw messages (first on, first off per key)."""
    open_: dict[tuple[int, int], list[tuple[float, int]]] = {}
    on, off, pitch, vel, ch = [], [], [], [], []
    pt, pv = [], []
    end = max((t for t, _ in events), default=0.0)
    for t, d in sorted(events, key=lambda e: e[0]):
        kind = d[0] & 0xF0
        if kind == 0x90 and d[2] > 0:
            open_.setdefault((d[0] & 15, d[1]), []).append((t, d[2]))
        elif kind in (0x80, 0x90):
            stack = open_.get((d[0] & 15, d[1]))
            if stack:
                t_on, v = stack.pop(0)
                on.append(t_on), off.append(t), pitch.append(d[1]), vel.append(v), ch.append(d[0] & 15)
        elif kind == 0xB0 and d[1] == 64:
            pt.append(t), pv.append(d[2])
    for (c, p), stack in open_.items():
        for t_on, v in stack:
            on.append(t_on), off.append(end), pitch.append(p), vel.append(v), ch.append(c)
    order = np.lexsort((np.asarray(pitch), np.asarray(on)))
    return Performance(
        onset=np.asarray(on, np.float64)[order],
        offset=np.asarray(off, np.float64)[order],
        pitch=np.asarray(pitch, np.int16)[order],
        velocity=np.asarray(vel, np.int16)[order],
        channel=np.asarray(ch, np.int8)[order],
        pedal_t=np.asarray(pt, np.float64),
        pedal_v=np.asarray(pv, np.int16),
    )
