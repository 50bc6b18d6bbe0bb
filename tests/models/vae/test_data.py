"""Melody extraction and the event representation."""

from __future__ import annotations

import numpy as np
import pytest

from cadenza.errors import MidiFileError
from cadenza.models.vae import data as D

from .helpers import scale_melody, write_notes


def test_file_events_file_round_trip_keeps_every_note(tmp_path):
    tpb = 96
    notes = scale_melody(tpb, bars=2)
    src = write_notes(tmp_path / "in.mid", notes, tpb=tpb, bpm=90)
    ext = D.file_melody(src, n_bars=2)
    assert ext.first_bar == 1 and ext.bpm == pytest.approx(90, abs=0.01) and ext.octave_shift == 0
    step = tpb // 4
    want = [(a // step, b // step, p) for a, b, p in notes]
    assert D.events_to_notes(ext.events) == [(float(a), float(b), p) for a, b, p in want]
    out = tmp_path / "out.mid"
    D.write_midi(out, ext.events, bpm=ext.bpm)
    again = D.file_melody(out, n_bars=2)
    assert np.array_equal(again.events, ext.events)
    assert again.bpm == pytest.approx(90, abs=0.01)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_top_voice_octave_fold_and_first_window(tmp_path):
    tpb = 96
    s = tpb // 4
    bar = 16 * s
    # two silent bars, then a melody over a bass line; the melody is two octaves up
    mel = [(2 * bar + i * 4 * s, 2 * bar + (i * 4 + 3) * s, 100 + (i % 3)) for i in range(8)]
    bass = [(2 * bar + i * 8 * s, 2 * bar + (i * 8 + 8) * s, 40) for i in range(4)]
    ext = D.file_melody(write_notes(tmp_path / "poly.mid", mel + bass, tpb=tpb), n_bars=2)
    assert ext.first_bar == 2  # bars 2-3: the first 2-bar window with notes
    assert ext.octave_shift == -12
    ons = [p for _, _, p in D.events_to_notes(ext.events)]
    assert ons and all(p == q - 12 for p, q in zip(ons, [100, 101, 102, 100]))


@pytest.mark.parametrize("case, msg", [("empty", "no notes"), ("drums", "only drums"), ("waltz", "4/4"), ("corrupt", "not a readable")])
def test_bad_files_raise_one_line(tmp_path, case, msg):
    p = tmp_path / f"{case}.mid"
    if case == "empty":
        write_notes(p, [])
    elif case == "drums":
        write_notes(p, scale_melody(), channel=9)
    elif case == "waltz":
        write_notes(p, scale_melody(), ts=(3, 4))
    else:
        p.write_bytes(b"MThd\x00\x00\x00\x06not midi")
    with pytest.raises(MidiFileError, match=msg) as ei:
        D.file_melody(p, 2)
    assert "\n" not in str(ei.value)


def test_notes_to_events_skyline_and_note_off():
    ev = D.notes_to_events([(0, 4, 60), (0, 2, 64), (6, 7, 62)], 8)
    assert list(ev) == [2 + 64 - D.LO, 0, D.NOTE_OFF, 0, 0, 0, 2 + 62 - D.LO, D.NOTE_OFF]
    assert list(D.clean_window(np.array([0, 1, 0, 5]))) == [0, 0, 0, 5]


@pytest.mark.slow
def test_pop909_windows(pop909_root):
    w = D.load_windows(pop909_root, "validation", 2)
    assert len(w) > 1000
    x = w.encode(np.arange(200))
    assert x.min() >= 0 and x.max() < D.VOCAB
    assert all(np.count_nonzero(e >= 2) >= 3 for e in x)
    rng = np.random.default_rng(0)
    y = w.encode(np.arange(200), rng)
    assert y.min() >= 0 and y.max() < D.VOCAB and np.array_equal(y == 0, x == 0)
