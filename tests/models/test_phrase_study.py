"""The generation study of `cadenza eval phrase` (models/phrase/calls.py): which prompts it draws
and how each generator is seeded, on synthetic pieces (no model, no data)."""

from __future__ import annotations

import numpy as np

from cadenza.midifile import Performance
from cadenza.models.phrase.calls import Named, real_next, study


def _pieces(n: int = 6) -> list[Performance]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        onset = np.cumsum(rng.uniform(0.1, 0.5, 200))
        pitch = rng.integers(48, 84, len(onset)).astype(np.int16)
        out.append(Performance(onset, onset + 0.2, pitch, np.full(len(onset), 80, np.int16), np.zeros(len(onset), np.int8)))
    return out


def _jitter(p, rng):
    """The real continuation with random pitch noise: its answers depend on the seed it gets."""
    on, off, pitch, vel = real_next(p, rng)
    return on, off, pitch + rng.integers(-3, 4, len(pitch)), vel


def _run(gens, seed=0):
    pieces = _pieces()
    return study(gens, lambda i: pieces[i], len(pieces), prompts=5, seconds=4.0, seed=seed, progress=False)


def test_adding_a_generator_changes_neither_the_prompts_nor_the_other_answers():
    alone = _run([Named("jitter", _jitter), Named("real", real_next)])
    more = _run([Named("other", _jitter), Named("jitter", _jitter), Named("real", real_next)])
    for name in ("jitter", "real"):
        for a, b in zip(alone.answers[name], more.answers[name], strict=True):
            np.testing.assert_array_equal(a.pitch, b.pitch)
            np.testing.assert_array_equal(a.onset, b.onset)
    assert alone.overlap["jitter"] == more.overlap["jitter"] and alone.relatedness == {k: more.relatedness[k] for k in alone.relatedness}
    # generators are seeded apart from each other: the same function under two names answers differently
    assert any(not np.array_equal(a.pitch, b.pitch) for a, b in zip(more.answers["other"], more.answers["jitter"], strict=True))


def test_another_seed_draws_other_prompts():
    a, b = _run([Named("real", real_next)], seed=0), _run([Named("real", real_next)], seed=1)
    assert any(len(x) != len(y) or not np.array_equal(x.pitch, y.pitch) for x, y in zip(a.answers["real"], b.answers["real"], strict=True))


def test_a_prompt_ends_as_a_call_does_on_stage_every_key_up():
    """Cut at an onset while the pianist holds keys, the prompt releases them at its end (a live
    phrase ends only with no key down, and an answer may release only its own keys)."""
    from cadenza.models.phrase import tokens as tk
    from cadenza.models.phrase.calls import make_prompt

    onset = np.array([0.0, 0.5, 1.0, 1.5, 3.0])
    offset = np.array([2.5, 0.9, 2.8, 1.6, 3.2])  # at t0 = 1.5 the keys 60 and 64 are down (67 is struck at t0 itself)
    pitch = np.array([60, 62, 64, 67, 69], np.int16)
    perf = Performance(onset, offset, pitch, np.full(5, 70, np.int16), np.zeros(5, np.int8))
    p = make_prompt(perf, 1.5, 1.0)
    assert not p.stream.sounding
    assert p.msgs[-2:] == [(1.5, bytes([0x80, 60, 0])), (1.5, bytes([0x80, 64, 0]))]
    assert p.hist[-2:] == [tk.NOTE_OFF0 + 60, tk.NOTE_OFF0 + 64]
    assert all(t < 1.5 for t, _ in p.msgs[:-2])
