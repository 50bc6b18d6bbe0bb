"""The offline refiner: a padded batch equals each piece alone (the backward direction starts at
each piece's own end), and it is only used with the context weights it was trained on."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cadenza.models.velocity.refine import OfflineRefiner, RefinerConfig, load_refiner, refine_many
from cadenza.models.velocity.weights import weights_path

SHIPPED = weights_path("offline").is_file()


def test_padded_batch_equals_each_piece_alone():
    torch.manual_seed(0)
    model = OfflineRefiner(RefinerConfig()).eval()
    torch.nn.init.normal_(model.out[2].weight, std=0.5)  # the shipped init is zero: make the correction visible
    rng = np.random.default_rng(0)
    lengths = [7, 130, 41]
    vz = [torch.from_numpy(rng.normal(size=(n, 129)).astype(np.float32)) for n in lengths]
    x = [rng.normal(size=(n, model.cfg.n_features)).astype(np.float32) for n in lengths]
    with torch.inference_mode():
        together = refine_many(model, vz, x)
        alone = [refine_many(model, [v], [f])[0] for v, f in zip(vz, x)]
    for a, b, n in zip(together, alone, lengths):
        assert a.shape == (n,)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert not np.allclose(alone[1].numpy(), 64.0 + 32.0 * vz[1][:, 0].numpy())


@pytest.mark.skipif(not SHIPPED, reason="no offline refiner shipped")
def test_shipped_refiner_belongs_to_shipped_context_weights():
    assert load_refiner() is not None


@pytest.mark.skipif(not SHIPPED, reason="no offline refiner shipped")
def test_refiner_is_not_used_with_other_context_weights(tmp_path, caplog):
    src = weights_path("context")
    other = tmp_path / src.name
    state = load_file(str(src))
    state["out.2.bias"] = state["out.2.bias"] + 0.01  # retrained weights, as far as the hash can tell
    save_file(state, str(other))
    shutil.copy(src.with_suffix(".json"), other.with_suffix(".json"))
    assert json.loads(other.with_suffix(".json").read_text())["config"]
    with caplog.at_level(logging.WARNING):
        assert load_refiner(other) is None
    assert "other context weights" in caplog.text


@pytest.mark.skipif(not SHIPPED, reason="no offline refiner shipped")
def test_offline_colorize_uses_the_refiner_and_lookahead_does_not():
    from cadenza.models.velocity.colorize import Colorizer

    assert Colorizer("offline").refiner is not None
    assert Colorizer("lookahead", seconds=1.0).refiner is None
