"""Rebuild ``demo_excerpt.mid`` from MAESTRO v2.0.0 (kept so the change to the source is on record).

    python bin/assets/make_demo_excerpt.py ../shared/data/maestro-v2.0.0

The excerpt ends at a breath in the music: the longest pause between onsets that ends 35–45 s
in, cut 50 ms before the next onset. Notes still sounding there get their note-off at the cut,
held pedals are released there, and the track ends there. Nothing else is changed: velocities,
timing, pedal and ticks are the performer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mido
import numpy as np

SOURCE = "2008/MIDI-Unprocessed_17_R2_2008_01-04_ORIG_MID--AUDIO_17_R2_2008_wav--1.midi"
WINDOW_S = (35.0, 45.0)
PEDALS = (64, 66, 67)  # sustain, sostenuto, soft


def cut_time(mid: mido.MidiFile) -> float:
    t, onsets = 0.0, []
    for msg in mid:
        t += msg.time
        if msg.type == "note_on" and msg.velocity > 0:
            onsets.append(t)
    on = np.unique(onsets)
    ends = on[1:]
    ok = (ends > WINDOW_S[0]) & (ends < WINDOW_S[1])
    gaps = np.where(ok, np.diff(on), -1.0)
    return float(ends[int(np.argmax(gaps))] - 0.05)


def excerpt(mid: mido.MidiFile, cut_s: float) -> mido.MidiFile:
    tempos = {m.tempo for tr in mid.tracks for m in tr if m.type == "set_tempo"}
    assert len(tempos) <= 1, "this cut assumes one tempo, as MAESTRO files have"
    tempo = tempos.pop() if tempos else 500_000
    cut = int(mido.second2tick(cut_s, mid.ticks_per_beat, tempo))
    out = mido.MidiFile(type=mid.type, ticks_per_beat=mid.ticks_per_beat)
    for track in mid.tracks:
        kept, tick, sounding, pedal = [], 0, {}, {}
        for msg in track:
            tick += msg.time
            if msg.type == "end_of_track":
                break
            key = (getattr(msg, "channel", 0), getattr(msg, "note", 0))
            is_on = msg.type == "note_on" and msg.velocity > 0
            is_off = msg.type == "note_off" or (msg.type == "note_on" and msg.velocity == 0)
            if tick >= cut and not (is_off and sounding.get(key)):
                continue
            if is_on:
                sounding[key] = sounding.get(key, 0) + 1
            elif is_off and sounding.get(key):
                sounding[key] -= 1
            elif msg.type == "control_change" and msg.control in PEDALS:
                pedal[(msg.channel, msg.control)] = msg.value
            kept.append((min(tick, cut), msg))
        for (chan, note), n in sounding.items():
            kept += [(cut, mido.Message("note_off", channel=chan, note=note, velocity=0))] * n
        kept += [(cut, mido.Message("control_change", channel=c, control=cc, value=0)) for (c, cc), v in pedal.items() if v > 0]
        kept.sort(key=lambda e: e[0])  # stable: the original order within a tick is kept
        new, last = mido.MidiTrack(), 0
        for t, msg in kept:
            new.append(msg.copy(time=t - last))
            last = t
        new.append(mido.MetaMessage("end_of_track", time=max(0, cut - last) if track is mid.tracks[-1] else 0))
        out.tracks.append(new)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) / SOURCE
    mid = mido.MidiFile(src)
    cut_s = cut_time(mid)
    out = excerpt(mid, cut_s)
    dest = Path(__file__).with_name("demo_excerpt.mid")
    from cadenza.atomic import atomic_path

    with atomic_path(dest) as tmp:
        out.save(tmp)
    print(f"{dest}: {out.length:.2f} s cut at {cut_s:.2f} s from {src.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
