"""Quality regression of the shipped velocity weights on five fixed MAESTRO test pieces.

The pieces are the five shortest of the test split (fixed names below, so the test is fast and
always the same). Inputs carry velocity 64 everywhere, as in `cadenza eval velocity`.

How the threshold was chosen (before looking at these five pieces): on the full test split
(178 pieces, `cadenza eval velocity --split test`) constant-64 scores 14.84 per-piece MAE, the
causal model 9.65 (a gain of 5.19), the context model offline 9.26 (gain 5.58) and the offline
path (context model + bidirectional refiner) 8.89 (gain 5.95).
A model passes when, on these five pieces, it keeps at least half of its full-test gain over
constant-64 scored on the same five pieces: MAE(model) <= MAE(constant 64) - gain / 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadenza.midifile import MidiFile
from cadenza.models.velocity.weights import weights_path

PIECES = [
    "2008/MIDI-Unprocessed_09_R3_2008_01-07_ORIG_MID--AUDIO_09_R3_2008_wav--2.midi",
    "2015/MIDI-Unprocessed_R1_D1-9-12_mid--AUDIO-from_mp3_11_R1_2015_wav--5.midi",
    "2015/MIDI-Unprocessed_R2_D1-2-3-6-7-8-11_mid--AUDIO-from_mp3_03_R2_2015_wav--1.midi",
    "2011/MIDI-Unprocessed_24_R1_2011_MID--AUDIO_R1-D9_11_Track11_wav.midi",
    "2004/MIDI-Unprocessed_SMF_17_R1_2004_03-06_ORIG_MID--AUDIO_20_R2_2004_12_Track12_wav--1.midi",
]
CONST_FULL = 14.84
FULL_TEST = {"causal": 9.65, "context": 9.26, "offline": 8.89}  # per-piece MAE on the full test split


def _score(maestro_root, predict):
    model_mae, const_mae = [], []
    for name in PIECES:
        perf = MidiFile.load(maestro_root / name).performance
        truth = perf.velocity.astype(float)
        v = predict(perf.with_velocity(np.full(len(perf), 64)))
        assert v.shape == truth.shape and v.min() >= 1 and v.max() <= 127
        model_mae.append(np.abs(v - truth).mean())
        const_mae.append(np.abs(64.0 - truth).mean())
    return float(np.mean(model_mae)), float(np.mean(const_mae))


def _keeps_half_its_gain(maestro_root, key: str, predict) -> None:
    """The rule of the module docstring for the model whose full-test figure is FULL_TEST[key]."""
    mae, const = _score(maestro_root, predict)
    gain = CONST_FULL - FULL_TEST[key]
    assert mae <= const - gain / 2, f"{key} {mae:.2f} vs constant-64 {const:.2f} on the five pieces"


@pytest.mark.maestro
def test_causal_beats_constant(maestro_root):
    from cadenza.models.velocity.causal import load_causal, predict_causal

    torch.set_num_threads(1)
    model = load_causal()
    _keeps_half_its_gain(maestro_root, "causal", lambda p: predict_causal(model, p))


@pytest.mark.maestro
@pytest.mark.skipif(not weights_path("context").is_file(), reason="context weights not shipped")
def test_context_offline_beats_constant(maestro_root):
    from cadenza.models.velocity.context import load_context, predict_offline

    torch.set_num_threads(1)
    model = load_context()
    _keeps_half_its_gain(maestro_root, "context", lambda p: predict_offline(model, p))


@pytest.mark.maestro
@pytest.mark.skipif(not weights_path("offline").is_file(), reason="offline refiner not shipped")
def test_offline_with_refiner_beats_constant(maestro_root):
    from cadenza.models.velocity.colorize import Colorizer

    torch.set_num_threads(1)
    colorizer = Colorizer("offline")
    assert colorizer.refiner is not None
    _keeps_half_its_gain(maestro_root, "offline", colorizer.velocities)
