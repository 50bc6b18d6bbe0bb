"""The shipped velocity models: causal really is causal, live steps equal the file pass, and the
lookahead model never looks further than it is allowed to."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cadenza.midifile import MidiFile, Performance
from cadenza.models.velocity.causal import NumpyCausalStep, load_causal, predict_causal
from cadenza.models.velocity.context import load_context, predict_lookahead, predict_window
from cadenza.models.velocity.features import LiveVelocityFeatures, replay_events, synthetic_performance
from cadenza.models.velocity.weights import weights_path

SHORT_TEST_PIECE = "2008/MIDI-Unprocessed_09_R3_2008_01-07_ORIG_MID--AUDIO_09_R3_2008_wav--2.midi"
needs_context = pytest.mark.skipif(not weights_path("context").is_file(), reason="context weights not trained yet")


@pytest.fixture(scope="module")
def causal():
    torch.set_num_threads(1)
    return load_causal()


def perturb_after(perf: Performance, t_cut: float, seed: int = 0) -> Performance:
    """Change everything that happens after ``t_cut``: later notes' pitches and times, every
    release after it (to another time after it), and later pedal values."""
    rng = np.random.default_rng(seed)
    later = perf.onset > t_cut
    onset = perf.onset.copy()
    onset[later] = t_cut + np.sort(rng.uniform(1e-3, 30.0, later.sum()))
    pitch = perf.pitch.copy()
    pitch[later] = rng.integers(21, 109, later.sum())
    offset = perf.offset.copy()
    rel = offset > t_cut
    offset[rel] = np.maximum(t_cut + rng.uniform(1e-3, 5.0, rel.sum()), onset[rel])
    order = np.lexsort((pitch, onset))
    pv = perf.pedal_v.copy()
    pv[perf.pedal_t > t_cut] = rng.integers(0, 128, (perf.pedal_t > t_cut).sum())
    return Performance(onset[order], offset[order], pitch[order], perf.velocity[order], perf.channel[order], perf.pedal_t, pv)


def _real_or_synthetic(root) -> Performance:
    if root is None:
        return synthetic_performance(600, seed=5)
    return MidiFile.load(root / SHORT_TEST_PIECE).performance


@pytest.fixture(params=["synthetic", "maestro"])
def perf(request):
    if request.param == "maestro":
        return _real_or_synthetic(request.getfixturevalue("maestro_root"))
    return _real_or_synthetic(None)


def test_causal_future_does_not_change_past(causal, perf):
    cut = len(perf) // 2
    t_cut = float(perf.onset[cut])
    other = perturb_after(perf, t_cut)
    a, b = predict_causal(causal, perf), predict_causal(causal, other)
    past = perf.onset <= t_cut  # the perturbation keeps these notes first, in the same order
    np.testing.assert_allclose(a[past], b[: past.sum()], atol=1e-4)
    assert np.abs(a[~past] - b[past.sum() :]).max() > 0.5  # the perturbation is not a no-op


@pytest.mark.parametrize("form", ["torch", "numpy"])
def test_live_steps_equal_file_pass(causal, form):
    """The live path (incremental features + one step per note-on) gives the file pass's numbers,
    in both the torch step (GPU) and the numpy step the CPU worker runs."""
    perf = synthetic_performance(300, seed=7)
    feats = LiveVelocityFeatures()
    stepper = causal if form == "torch" else NumpyCausalStep(causal)
    state = stepper.initial_state(1)
    live = np.zeros(len(perf))
    for t, kind, val, i in replay_events(perf):
        if kind == "on":
            x = feats.note_on(t, val)[None]
            v, state = stepper.step(torch.from_numpy(x) if form == "torch" else x, state)
            live[i] = float(v[0])
        elif kind == "off":
            feats.note_off(t, val)
        else:
            feats.pedal(t, val)
    np.testing.assert_allclose(live, predict_causal(causal, perf), atol=1e-3)
    assert live.min() >= 1 and live.max() <= 127 and live.std() > 1.0


def test_step_batches_sessions_along_dim0(causal):
    x = torch.randn(3, causal.n_features)
    s = causal.initial_state(3)
    v, s2 = causal.step(x, s)
    assert v.shape == (3,) and s2.shape[0] == 3
    v1, _ = causal.step(x[1:2], s.narrow(causal.state_batch_dim, 1, 1))
    assert torch.allclose(v[1], v1[0], atol=1e-5)
    fast = NumpyCausalStep(causal)
    vn, sn = fast.step(x.numpy(), fast.initial_state(3))
    np.testing.assert_allclose(vn, v.numpy(), atol=1e-3)
    np.testing.assert_allclose(sn, s2.numpy(), atol=1e-5)


@needs_context
@pytest.mark.parametrize("seconds", [0.0, 0.5, 2.0])
def test_lookahead_sees_only_its_horizon(perf, seconds):
    model = load_context()
    n = min(len(perf), 800)
    perf = Performance(perf.onset[:n], perf.offset[:n], perf.pitch[:n], perf.velocity[:n], perf.channel[:n], perf.pedal_t, perf.pedal_v)
    t_cut = float(perf.onset[n // 2])
    other = perturb_after(perf, t_cut, seed=1)
    a, b = predict_lookahead(model, perf, seconds), predict_lookahead(model, other, seconds)
    fixed = perf.onset + seconds < t_cut
    fixed &= perf.onset <= t_cut
    assert fixed.sum() > 50
    np.testing.assert_allclose(a[fixed], b[: len(a)][fixed], atol=1e-4)


@needs_context
def test_predict_window_matches_file_pass_for_released_notes():
    model = load_context()
    perf = synthetic_performance(200, seed=9)
    from cadenza.models.velocity.features import causal_features

    full = predict_lookahead(model, perf, 1.0)
    targets = np.arange(50, 60)
    w = predict_window(model, causal_features(perf), perf.onset, perf.offset, perf.pitch, 1.0, targets)
    np.testing.assert_allclose(w, full[targets], atol=1e-4)
    assert not math.isnan(w.sum())
