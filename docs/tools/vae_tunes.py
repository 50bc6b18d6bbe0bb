"""Reconstruction of melodies that are not POP909: four public-domain tunes, entered by hand.

    python docs/tools/vae_tunes.py [--models mel_2bar mel_16bar] [--json]

Each tune is written to a MIDI file and read back the way `cadenza vae reconstruct` reads a user's
file (top voice, sixteenth grid, first window). The 16-bar models get the whole tune; the 2-bar
model gets every 2-bar window with at least 3 notes (hop one bar), read through the same file
path. Accuracy per sixteenth as in `cadenza eval vae`: greedy (posterior mean, argmax), sampled
(z drawn from the posterior, the decoder sampling at temperature 1; mean of 8 draws) and
the share of note-ons given back at the right step with the right pitch. Nothing here was used to
choose or train a model; the tables are in docs/vae.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mido
import numpy as np

# (name, bars of "pitch:sixteenths" tokens; "r" is a rest). C major, middle C = C4 = 60.
NAMES = {"C3": 48, "D3": 50, "E3": 52, "F3": 53, "G3": 55, "A3": 57, "B3": 59}
NAMES.update({n[0] + "4": v + 12 for n, v in NAMES.items()})
NAMES.update({"C5": 72, "D5": 74, "E5": 76})

TUNES = {
    "Ode to Joy (Beethoven)": [
        "E4:4 E4:4 F4:4 G4:4",
        "G4:4 F4:4 E4:4 D4:4",
        "C4:4 C4:4 D4:4 E4:4",
        "E4:6 D4:2 D4:8",
        "E4:4 E4:4 F4:4 G4:4",
        "G4:4 F4:4 E4:4 D4:4",
        "C4:4 C4:4 D4:4 E4:4",
        "D4:6 C4:2 C4:8",
        "D4:4 D4:4 E4:4 C4:4",
        "D4:4 E4:2 F4:2 E4:4 C4:4",
        "D4:4 E4:2 F4:2 E4:4 D4:4",
        "C4:4 D4:4 G3:8",
        "E4:4 E4:4 F4:4 G4:4",
        "G4:4 F4:4 E4:4 D4:4",
        "C4:4 C4:4 D4:4 E4:4",
        "D4:6 C4:2 C4:8",
    ],
    "Jingle Bells (Pierpont), chorus": [
        "E4:4 E4:4 E4:8",
        "E4:4 E4:4 E4:8",
        "E4:4 G4:4 C4:6 D4:2",
        "E4:16",
        "F4:4 F4:4 F4:6 F4:2",
        "F4:4 E4:4 E4:4 E4:2 E4:2",
        "E4:4 D4:4 D4:4 E4:4",
        "D4:8 G4:8",
        "E4:4 E4:4 E4:8",
        "E4:4 E4:4 E4:8",
        "E4:4 G4:4 C4:6 D4:2",
        "E4:16",
        "F4:4 F4:4 F4:4 F4:4",
        "F4:4 E4:4 E4:4 E4:2 E4:2",
        "G4:4 G4:4 F4:4 D4:4",
        "C4:16",
    ],
    "Frère Jacques, twice": [
        "C4:4 D4:4 E4:4 C4:4",
        "C4:4 D4:4 E4:4 C4:4",
        "E4:4 F4:4 G4:8",
        "E4:4 F4:4 G4:8",
        "G4:2 A4:2 G4:2 F4:2 E4:4 C4:4",
        "G4:2 A4:2 G4:2 F4:2 E4:4 C4:4",
        "C4:4 G3:4 C4:8",
        "C4:4 G3:4 C4:8",
    ]
    * 2,
    "Oh! Susanna (Foster)": [
        "r:12 C4:2 D4:2",
        "E4:4 G4:4 G4:6 A4:2",
        "G4:4 E4:4 C4:6 D4:2",
        "E4:4 E4:4 D4:4 C4:4",
        "D4:12 C4:2 D4:2",
        "E4:4 G4:4 G4:6 A4:2",
        "G4:4 E4:4 C4:6 D4:2",
        "E4:4 E4:4 D4:4 D4:4",
        "C4:12 r:4",
        "F4:8 F4:8",
        "A4:4 A4:8 A4:4",
        "G4:4 G4:4 E4:4 C4:4",
        "D4:12 C4:2 D4:2",
        "E4:4 G4:4 G4:6 A4:2",
        "G4:4 E4:4 C4:6 D4:2",
        "E4:4 E4:4 D4:4 D4:4",
    ],
}


def tune_notes(bars: list[str], tpb: int = 96) -> list[tuple[int, int, int]]:
    """[(on_tick, off_tick, pitch)], each bar checked to fill exactly 16 sixteenths."""
    s = tpb // 4
    out, t = [], 0
    for i, bar in enumerate(bars):
        start = t
        for tok in bar.split():
            name, dur = tok.split(":")
            if name != "r":
                out.append((t * s, (t + int(dur)) * s, NAMES[name]))
            t += int(dur)
        if t - start != 16:
            raise ValueError(f"bar {i + 1} holds {t - start} sixteenths")
    return out


def write_tune(path: Path, notes, tpb: int = 96, bpm: float = 100.0, start_tick: int = 0) -> Path:
    mid = mido.MidiFile(type=0, ticks_per_beat=tpb)
    tr = mido.MidiTrack()
    mid.tracks.append(tr)
    tr.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))
    tr.append(mido.MetaMessage("time_signature", numerator=4, denominator=4))
    ev = sorted(
        [(a - start_tick, 1, p) for a, b, p in notes if a >= start_tick] + [(b - start_tick, 0, p) for a, b, p in notes if a >= start_tick]
    )
    last = 0
    for t, on, p in ev:
        tr.append(mido.Message("note_on", note=p, velocity=80 if on else 0, time=t - last))
        last = t
    mid.save(str(path))
    return path


def score(model, x, draws: int = 8, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mu, sigma = model.encode(x)
        greedy = model.decode(mu, 0.0)
        sampled = [(model.decode(mu + sigma * torch.randn(mu.shape, generator=g), 1.0, g) == x).float().mean().item() for _ in range(draws)]
    on = x >= 2
    return {
        "greedy": (greedy == x).float().mean().item(),
        "sampled": float(np.mean(sampled)),
        "note_on": (greedy[on] == x[on]).float().mean().item(),
        "no_event_share": (x == 0).float().mean().item(),
    }


def main() -> int:
    import torch

    from cadenza.models.vae.data import file_melody
    from cadenza.models.vae.weights import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mel_2bar", "mel_16bar"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, _, _ = load_model(name)
            n_bars = model.cfg.n_bars
            for tune, bars in TUNES.items():
                notes = tune_notes(bars)
                windows = []
                for b in range(0, len(bars) - n_bars + 1):
                    path = write_tune(Path(tmp) / f"{len(rows)}_{b}.mid", notes, start_tick=b * 4 * 96)
                    ex = file_melody(path, n_bars, min_notes=3)
                    if ex.first_bar == 1:  # the window that starts at bar b + 1 of the tune
                        windows.append(ex.events)
                x = torch.from_numpy(np.stack(windows))
                r = score(model, x)
                rows.append({"model": name, "tune": tune, "windows": len(windows), **{k: round(v, 3) for k, v in r.items()}})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<11}{'tune':<34}{'windows':>8}{'greedy':>8}{'sampled':>9}{'note-on':>9}{'no-event':>10}")
    for r in rows:
        print(
            f"{r['model']:<11}{r['tune']:<34}{r['windows']:>8}{r['greedy']:>8.3f}{r['sampled']:>9.3f}{r['note_on']:>9.3f}{r['no_event_share']:>10.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
