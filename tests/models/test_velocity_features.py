"""The two forms of the note features (whole file / one note-on at a time) give the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from cadenza.midifile import MidiFile, Performance
from cadenza.models.velocity.features import N_FEATURES, causal_features, live_features, synthetic_performance


def test_vectorised_equals_incremental_synthetic():
    perf = synthetic_performance()
    a, b = causal_features(perf), live_features(perf)
    assert a.shape == (len(perf), N_FEATURES) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.maestro
def test_vectorised_equals_incremental_on_maestro(maestro_root):
    path = maestro_root / "2008/MIDI-Unprocessed_09_R3_2008_01-07_ORIG_MID--AUDIO_09_R3_2008_wav--2.midi"
    perf = MidiFile.load(path).performance
    np.testing.assert_array_equal(causal_features(perf), live_features(perf))


def test_features_ignore_velocities():
    perf = synthetic_performance(seed=1)
    loud = perf.with_velocity(np.random.default_rng(0).integers(1, 128, len(perf)))
    np.testing.assert_array_equal(causal_features(perf), causal_features(loud))


def test_features_are_causal():
    """Everything after time T (notes, releases, pedal) may change; features up to T may not."""
    perf = synthetic_performance(seed=2)
    cut = 200
    t_cut = perf.onset[cut]
    later = perf.onset > t_cut
    rng = np.random.default_rng(3)
    pitch = perf.pitch.copy()
    pitch[later] = rng.integers(30, 100, later.sum())
    offset = perf.offset.copy()
    late_rel = offset > t_cut
    offset[late_rel] = t_cut + rng.uniform(0.001, 3.0, late_rel.sum())
    offset = np.maximum(offset, perf.onset)
    pv = perf.pedal_v.copy()
    pv[perf.pedal_t > t_cut] = 127 - pv[perf.pedal_t > t_cut]
    other = Performance(perf.onset, offset, pitch, perf.velocity, perf.channel, perf.pedal_t, pv)
    keep = ~later
    np.testing.assert_array_equal(causal_features(perf)[keep], causal_features(other)[keep])
