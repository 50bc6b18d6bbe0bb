"""Small MIDI files written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import mido


def write_notes(path: Path, notes, tpb: int = 96, ts=(4, 4), bpm: float = 100.0, channel: int = 0) -> Path:
    """notes: [(on_tick, off_tick, pitch)] -> a type-0 file."""
    mid = mido.MidiFile(type=0, ticks_per_beat=tpb)
    tr = mido.MidiTrack()
    mid.tracks.append(tr)
    tr.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))
    if ts is not None:
        tr.append(mido.MetaMessage("time_signature", numerator=ts[0], denominator=ts[1]))
    ev = sorted([(a, 1, p) for a, b, p in notes] + [(b, 0, p) for a, b, p in notes], key=lambda e: (e[0], e[1]))
    last = 0
    for t, on, p in ev:
        tr.append(mido.Message("note_on", note=p, velocity=80 if on else 0, channel=channel, time=t - last))
        last = t
    mid.save(str(path))
    return path


def scale_melody(tpb: int = 96, bars: int = 2, base: int = 60):
    """Eighth notes up and down a C major scale, on the sixteenth grid."""
    s = tpb // 4
    steps = [0, 2, 4, 5, 7, 9, 11, 12, 11, 9, 7, 5, 4, 2, 0, 2]
    return [(i * 2 * s, i * 2 * s + s + (s if i % 4 == 3 else 0), base + steps[i % 16]) for i in range(bars * 8)]
