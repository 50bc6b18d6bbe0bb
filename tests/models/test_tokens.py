"""Event tokens: incremental encoding, decoding, and the file -> tokens -> file round trip."""

from __future__ import annotations

import numpy as np

from cadenza.midifile import MidiFile, Performance, write_performance
from cadenza.models.phrase import tokens as tk


def _perf() -> Performance:
    rng = np.random.default_rng(0)
    n = 300
    onset = np.sort(rng.uniform(0, 40, n))
    onset[10] = onset[9]  # a chord
    dur = rng.uniform(0.004, 3.0, n)  # some notes shorter than the quantum
    pitch = rng.integers(21, 109, n)
    pitch[50:53] = 60  # the same key struck again while still held
    onset[50:53] = [20.0, 20.3, 20.6]
    dur[50:53] = 1.0
    order = np.lexsort((pitch, onset))
    return Performance(
        onset[order],
        (onset + dur)[order],
        pitch[order].astype(np.int16),
        rng.integers(1, 128, n)[order].astype(np.int16),
        np.zeros(n, np.int8),
        np.array([1.0, 5.123, 9.0, 12.0, 30.0]),
        np.array([100, 0, 64, 90, 10], np.int16),
    )


def _match(a: Performance, b: Performance, q: float, t0: float = 0.0):
    """Every note of a in b: same pitch, onset within half a quantum (a's times from t0)."""
    assert len(a) == len(b)
    ia = np.lexsort((a.pitch, np.round((a.onset - t0) / q)))
    ib = np.lexsort((b.pitch, np.round((b.onset - t0) / q)))
    assert np.array_equal(a.pitch[ia], b.pitch[ib])
    assert np.abs(a.onset[ia] - b.onset[ib]).max() <= q / 2 + 1e-9
    return ia, ib


def test_vocabulary_is_contiguous_and_named():
    names = {tk.token_name(i) for i in range(tk.VOCAB_SIZE)}
    assert len(names) == tk.VOCAB_SIZE == 391
    assert tk.token_name(tk.SHIFT0 + tk.MAX_SHIFT - 1) == "SHIFT_100"


def test_feed_is_incremental_and_equals_whole_file_encoding():
    perf = _perf()
    whole = tk.encode_performance(perf)
    stream, toks = tk.TokenStream(), [tk.BOS]
    for t, _, kind, p, v in tk.performance_events(perf):
        toks += stream.feed(t, kind, p, v)  # one event at a time, as a live player would
    assert np.array_equal(whole, toks)
    assert stream.sounding == set()


def test_round_trip_keeps_every_note_within_the_quantum(tmp_path):
    perf = _perf()
    toks = tk.encode_performance(perf)
    t0 = min(perf.onset.min(), perf.pedal_t.min())
    back = tk.decode_tokens(toks, t0=t0)
    q = tk.QUANTUM_S
    ia, ib = _match(perf, back, q, t0)
    # offsets within one quantum; a key struck again while held ends where it is struck again
    expect = perf.offset.copy()
    for i in range(len(perf)):
        later = perf.onset[(perf.pitch == perf.pitch[i]) & (perf.onset > perf.onset[i])]
        if len(later):
            expect[i] = min(expect[i], later.min())
    assert (expect < perf.offset).sum() >= 2  # the test does exercise re-strikes
    assert np.abs(expect[ia] - back.offset[ib]).max() <= q + 1e-9
    assert np.abs(perf.pedal_t[[0, 1, 2, 4]] - back.pedal_t).max() <= q / 2 + 1e-9  # 64 -> 90: still down, no token
    # and through a real file
    write_performance(back, tmp_path / "rt.mid")
    again = MidiFile.load(tmp_path / "rt.mid").performance
    _match(back, again, q, t0)
    assert np.array_equal(tk.encode_performance(again), tk.encode_performance(back))


def test_long_gaps_and_velocities():
    s = tk.TokenStream()
    toks = s.feed(0.0, tk.ON, 60, 100) + s.feed(2.5, tk.OFF, 60)
    assert [tk.token_name(t) for t in toks] == ["VEL_25", "ON_60", "SHIFT_100", "SHIFT_100", "SHIFT_50", "OFF_60"]
    assert s.feed(3.0, tk.OFF, 60) == []  # not sounding: nothing
    assert tk.token_name(s.feed(3.0, tk.ON, 61, 101)[-1]) == "ON_61"  # same velocity bin: no VEL token


def test_round_trip_on_a_maestro_file(maestro_root):
    f = sorted((maestro_root / "2004").glob("*.midi"))[0]
    perf = MidiFile.load(f).performance
    toks = tk.encode_performance(perf)
    t0 = min(perf.onset.min(), perf.pedal_t.min(initial=np.inf))
    back = tk.decode_tokens(toks, t0=t0)
    _match(perf, back, tk.QUANTUM_S, t0)
