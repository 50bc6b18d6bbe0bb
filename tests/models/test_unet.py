"""The U-Net colorizer: image layout, masked loss, whole-piece tiling, the shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cadenza.errors import ModelError
from cadenza.midifile import Performance
from cadenza.models.velocity.unet import (
    DEFAULT_WEIGHTS,
    UNet,
    UNetConfig,
    load_unet,
    logits_to_velocity,
    masked_loss,
    piano_roll,
    predict_unet,
)


def synthetic(seconds: float, n: int, seed: int = 0) -> Performance:
    rng = np.random.default_rng(seed)
    onset = np.sort(rng.uniform(0, seconds, n))
    pitch = rng.integers(21, 109, n).astype(np.int16)
    order = np.lexsort((pitch, onset))
    onset, pitch = onset[order], pitch[order]
    offset = onset + rng.uniform(0.05, 2.0, n)
    return Performance(
        onset, offset, pitch, np.full(n, 64, np.int16), np.zeros(n, np.int8), np.array([1.0, 3.0]), np.array([127, 0], np.int16)
    )


def tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(base=4, attn_heads=2)).eval()


def test_piano_roll_places_onsets_holds_and_pedal():
    fs = 10.0 / 96
    x = piano_roll(np.array([0.5]), np.array([1.0]), np.array([60]), np.array([0.0, 2.0]), np.array([127, 0]), 0.0, 96, fs)
    assert x.shape == (3, 88, 96)
    col = int(0.5 // fs)
    assert np.argwhere(x[0]).tolist() == [[60 - 21, col]]
    held = np.flatnonzero(x[1, 60 - 21])
    assert held[0] == col and held[-1] == int(1.0 // fs)
    assert x[1].sum() == len(held)  # no other key held
    assert np.all(x[2, :, : int(2.0 // fs)] == 1.0) and np.all(x[2, :, int(2.0 // fs) + 1 :] == 0.0)


def test_forward_shape_and_loss_only_at_onset_cells():
    model = tiny().train()
    x = torch.zeros(2, 3, 88, 96)
    logits = model(x)
    assert logits.shape == (2, 88, 96)
    v = logits_to_velocity(logits.detach())
    assert float(v.min()) >= 1.0 and float(v.max()) <= 127.0
    mask = torch.zeros(2, 88, 96)
    mask[0, 40, 10] = mask[1, 5, 90] = 1
    target = torch.full((2, 88, 96), 80.0)
    for kind in ("l1", "bce"):
        base = masked_loss(logits, target, mask, kind)
        other = target.clone()
        other[mask == 0] = 1.0  # changing unlabelled cells must not change the loss
        assert torch.allclose(base, masked_loss(logits, other, mask, kind))
        leaf = logits.detach().requires_grad_(True)
        masked_loss(leaf, target, mask, kind).backward()
        assert torch.all(leaf.grad[mask == 0] == 0) and torch.all(leaf.grad[mask == 1] != 0)


def test_tiling_gives_every_note_a_velocity():
    model = tiny()
    perf = synthetic(37.0, 400)
    # Two notes in one onset cell must share its value.
    perf.onset[10:12] = perf.onset[10]
    perf.pitch[10:12] = perf.pitch[10]
    v = predict_unet(model, perf, batch=3)
    assert v.shape == (400,) and v.dtype == np.float32
    assert np.all(np.isfinite(v)) and v.min() >= 1 and v.max() <= 127
    assert v[10] == v[11]
    # Input velocities are ignored.
    assert np.array_equal(v, predict_unet(model, perf.with_velocity(np.full(400, 100)), batch=3))


def test_single_window_prediction_is_the_cell_value():
    model = tiny()
    perf = synthetic(8.0, 50, seed=1)
    v = predict_unet(model, perf)
    fs = model.cfg.frame_s
    x = piano_roll(perf.onset, perf.offset, perf.pitch, perf.pedal_t, perf.pedal_v, 0.0, 96, fs)
    with torch.no_grad():
        img = logits_to_velocity(model(torch.from_numpy(x)[None]))[0].numpy()
    expect = img[perf.pitch - 21, np.floor(perf.onset / fs).astype(int)]
    np.testing.assert_allclose(v, expect, rtol=1e-5)


def test_onset_only_variant_and_bad_channel_count():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base=4, attn_heads=0, in_channels=1)).eval()
    assert predict_unet(model, synthetic(15.0, 80)).shape == (80,)
    with pytest.raises(ModelError, match="in_channels"):
        UNet(UNetConfig(in_channels=4))


def test_empty_performance():
    assert predict_unet(tiny(), synthetic(1.0, 0)).shape == (0,)


def test_shipped_weights_load_and_predict():
    meta = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert meta["model"] == "unet"
    assert DEFAULT_WEIGHTS.stat().st_size <= 16 * 2**20
    model = load_unet()
    v = predict_unet(model, synthetic(12.0, 120, seed=2))
    assert v.shape == (120,) and v.min() >= 1 and v.max() <= 127
    assert v.std() > 0.5  # a trained colorizer does not answer a constant


def test_missing_or_mismatched_weights_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_unet(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad))
    bad.with_suffix(".json").write_text(json.dumps({"model": "unet", "config": {"base": 4}}))
    with pytest.raises(ModelError, match="do not match"):
        load_unet(bad)


@pytest.mark.maestro
def test_shipped_weights_beat_constant_64_on_test_pieces(maestro_root):
    # The full test split is `cadenza eval velocity --model unet` (figures in docs/models.md).
    # On these three pieces the U-Net must be at least 1 velocity unit better than constant 64.
    from cadenza.midifile import load_performance
    from cadenza.models.velocity.train_unet import split_files

    model = load_unet()
    ours, flat = [], []
    for f in split_files(maestro_root, "test")[:3]:
        perf = load_performance(f)
        v = predict_unet(model, perf.with_velocity(np.full(len(perf), 64)))
        ours.append(np.abs(v - perf.velocity).mean())
        flat.append(np.abs(64 - perf.velocity).mean())
    assert np.mean(ours) < np.mean(flat) - 1.0
