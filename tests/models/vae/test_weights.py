"""The shipped weights: format, size, held-out reconstruction, and attribute vectors.

Threshold derivation (held-out reconstruction): `cadenza eval vae --model M --split test`
gives the greedy accuracy G over 1000 test windows and the standard deviation s of the per-window
greedy accuracy (both stored in the weights' JSON as eval_test.greedy_acc and
eval_test.greedy_acc_window_sd). The mean over the n = 24 windows scored here (evenly spaced over
the test split) has standard error s / sqrt(n); the test asserts mean >= G - 4 s / sqrt(n), which a
correct model fails with probability < 1e-4 and a broken one (e.g. always "no event", about 0.6 on
POP909) fails for sure. Without POP909 a written scale melody (16 eighth notes in 2 bars, denser
than almost every POP909 window) must come back with >= 0.6 of its sixteenths right: the shipped
model scores 0.72 on it, an all-rest output 0.5.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cadenza.models.vae import attributes as A  # noqa: E402
from cadenza.models.vae.weights import MODELS, load_model, meta_path, weights_path  # noqa: E402

from .helpers import scale_melody, write_notes  # noqa: E402


@pytest.mark.parametrize("name", MODELS)
def test_weights_are_safetensors_with_config(name):
    p = weights_path(name)
    if not p.is_file():
        pytest.skip(f"{p.name} not trained")
    assert p.stat().st_size <= 16 * 2**20
    assert p.read_bytes()[8:9] == b"{"  # safetensors header, no pickle
    meta = json.loads(meta_path(p).read_text())
    assert meta["config"]["name"] == name and meta["runs"] and meta["runs"][-1]["curve"]
    model, _, attrs = load_model(name)
    assert set(attrs) == set(A.NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mel_2bar", "mel_16bar"])
def test_shipped_weights_reconstruct_held_out_melodies(pop909_root, name):
    from cadenza.models.vae.data import load_windows

    torch.set_num_threads(1)
    model, meta, _ = load_model(name)
    ev = meta["eval_test"]
    w = load_windows(pop909_root, "test", model.cfg.n_bars)
    n = 24
    idx = np.linspace(0, len(w) - 1, n).astype(int)
    x = torch.from_numpy(w.encode(idx))
    with torch.no_grad():
        acc = (model.decode(model.encode(x)[0], 0.0) == x).float().mean(1).numpy()
    threshold = ev["greedy_acc"] - 4 * ev["greedy_acc_window_sd"] / math.sqrt(n)
    assert acc.mean() >= threshold, (acc.mean(), threshold)


def test_mel_2bar_reconstructs_a_written_melody(tmp_path):
    from cadenza.models.vae.data import file_melody

    model, _, _ = load_model("mel_2bar")
    m = file_melody(write_notes(tmp_path / "m.mid", scale_melody()), 2)
    x = torch.from_numpy(m.events)[None]
    with torch.no_grad():
        out = model.decode(model.encode(x)[0], 0.0)
    assert (out == x).float().mean().item() >= 0.6


def test_attribute_vectors_move_their_attribute():
    """Greedy decodes of prior samples, then of the same z plus / minus 1.5 attribute vectors (no data
    needed). The interval vector is weak (+0.2 standard deviations in the eval matrix) and is checked
    on data below."""
    torch.manual_seed(0)
    model, _, attrs = load_model("mel_2bar")
    z = torch.randn(64, model.cfg.z_dim)
    with torch.no_grad():
        base = A.attribute_matrix(model.decode(z, 0.0).numpy())
        for j, name in enumerate(A.NAMES):
            if name == "interval":
                continue
            up = A.attribute_matrix(model.decode(z + 1.5 * attrs[name], 0.0).numpy())
            down = A.attribute_matrix(model.decode(z - 1.5 * attrs[name], 0.0).numpy())
            assert np.nanmean(up[:, j]) > np.nanmean(base[:, j]) > np.nanmean(down[:, j]), name


@pytest.mark.slow
def test_interval_vector_widens_leaps_of_test_melodies(pop909_root):
    from cadenza.models.vae.data import load_windows

    model, _, attrs = load_model("mel_2bar")
    w = load_windows(pop909_root, "test", 2)
    x = torch.from_numpy(w.encode(np.linspace(0, len(w) - 1, 200).astype(int)))
    j = A.NAMES.index("interval")
    with torch.no_grad():
        mu = model.encode(x)[0]
        up = A.attribute_matrix(model.decode(mu + 1.5 * attrs["interval"], 0.0).numpy())[:, j]
        down = A.attribute_matrix(model.decode(mu - 1.5 * attrs["interval"], 0.0).numpy())[:, j]
    assert np.nanmean(up) > np.nanmean(down)
