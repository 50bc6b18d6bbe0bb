"""A recorder of the engine's output, and the conversion of what it kept into notes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cadenza.midifile import Performance


@dataclass
class Recorder:
    """A tagged sink that keeps everything the engine sent, with music time and tag."""

    name = "recorder"
    events: list[tuple[float, bytes, object]] = field(default_factory=list)

    def send_tagged(self, t: float, data: bytes, tag: object) -> None:
        self.events.append((t, data, tag))

    def close(self) -> None:
        pass

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
