"""`cadenza bench window`: what the sliding piano-roll window costs the first note after a pause.

Every note-on and note-off scrolls its channel's window to the note's time, clearing the frames
that scrolled in, so the cost of a note can grow with the silence before it. For each gap G
(``--idle-gaps``, plus 0 as the reference), notes are played each G seconds of music time after
the previous one's release — the gap is in music time, so nothing waits for it and the model's
caches stay as warm as in the reference. Two figures per gap, medians over ``--notes`` notes:

- ``window_us``: the window's ``note_on`` alone;
- ``engine_us``: arrival → handed to the sink, through the engine (mode ``thru``: no model, so
  the figure is the engine's own path, window included).
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from cadenza.buffers.pianoroll import PianoRollWindow
from cadenza.messages import note_off, note_on
from cadenza.stream.build import build_engine


def register(b) -> None:
    p = b.add_parser("window", help="cost of the piano-roll window for the first note after a pause")
    p.add_argument("--idle-gaps", default="1,10", help="pauses before each note, in seconds, comma separated (default 1,10)")
    p.add_argument("--notes", type=int, default=300, help="notes measured per gap (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_window)


class _StampSink:
    """Notes when each note-on reached the sinks (a Sink, so the engine treats it as a port)."""

    name = "stamp"

    def __init__(self) -> None:
        self.at: list[float] = []

    def send(self, data: bytes) -> None:
        if data[0] & 0xF0 == 0x90 and data[2] > 0:
            self.at.append(time.monotonic())

    def close(self) -> None:
        pass


def window_alone(settings, gap: float, notes: int) -> float:
    """Median microseconds of ``PianoRollWindow.note_on`` after ``gap`` seconds of silence."""
    eng = settings.engine
    roll = PianoRollWindow(frame_s=eng.frame_ms / 1000, window_s=eng.window_s)
    t, cost = 0.0, []
    for k in range(notes):
        t += gap
        t0 = time.perf_counter_ns()
        roll.note_on(t, 60 + k % 12, 64)
        cost.append(time.perf_counter_ns() - t0)
        t += 0.05
        roll.note_off(t, 60 + k % 12)
    return float(np.median(cost)) / 1e3


async def through_engine(settings, gap: float, notes: int) -> float:
    """Median microseconds from arrival to the sink of a note-on after ``gap`` s of silence."""
    sink = _StampSink()
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"stats_interval_s": 0})})
    async with build_engine(settings, "thru", [sink]) as engine:
        run = asyncio.create_task(engine.run())
        await asyncio.sleep(0.05)
        base, sent = asyncio.get_running_loop().time(), []
        for k in range(notes):
            base += gap
            t = time.monotonic()
            sent.append(t)
            engine.deliver_now(t, note_on(0, 60 + k % 12, 64), music_t=base)
            await engine.drain()
            base += 0.05
            engine.deliver_now(time.monotonic(), note_off(0, 60 + k % 12), music_t=base)
            await engine.drain()
        engine.stop()
        await run
    return float(np.median(np.asarray(sink.at[:notes]) - np.asarray(sent))) * 1e6


def _window(args, settings) -> int:
    gaps = [0.0] + [float(g) for g in args.idle_gaps.split(",") if g.strip()]
    rows = []
    for gap in gaps:
        engine_us = asyncio.run(through_engine(settings, gap, args.notes))
        rows.append({"gap_s": gap, "window_us": round(window_alone(settings, gap, args.notes), 2), "engine_us": round(engine_us, 1)})
    result = {"frame_ms": settings.engine.frame_ms, "window_s": settings.engine.window_s, "notes": args.notes, "gaps": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"piano-roll window {settings.engine.window_s:g} s of {settings.engine.frame_ms:g} ms frames; medians over {args.notes} notes")
    for r in rows:
        print(
            f"  after {r['gap_s']:5g} s silence: window note_on {r['window_us']:8.2f} us, engine arrival -> sink {r['engine_us']:8.1f} us"
        )
    return 0
