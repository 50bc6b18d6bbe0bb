"""Resuming a VAE training run: a checkpoint from an older config resumes, another architecture is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = {"z_dim": 8, "emb": 8, "enc_hidden": 16, "dec_hidden": 16, "dec_layers": 1, "cond_hidden": 16}


def _opts(tmp_path, **kw):
    from cadenza.models.vae.train import TrainOptions

    base = dict(model="mel_2bar", max_steps=2, batch=8, epoch_size=16, val_size=16, out=tmp_path / "w.safetensors", overrides=TINY)
    return TrainOptions(**{**base, **kw})


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CADENZA_VAE_CACHE", str(Path(".cache/vae").resolve()))  # the preprocessed POP909, built once
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_checkpoint_from_before_a_config_field_resumes_with_new_loss_settings(pop909_root, in_tmp):
    from cadenza.models.vae.train import ckpt_path, train
    from cadenza.models.vae.weights import read_meta

    train(pop909_root, _opts(in_tmp), progress=False)
    ck = ckpt_path("mel_2bar", in_tmp / "w.safetensors")
    saved = torch.load(ck, weights_only=True)
    del saved["config"]["enc_bar_hidden"]  # the field came later; older checkpoints lack it
    torch.save(saved, ck)

    train(pop909_root, _opts(in_tmp, max_steps=4, overrides={**TINY, "free_bits": 64.0}), progress=False)
    runs = read_meta(in_tmp / "w.safetensors")["runs"]
    assert [r["steps"] for r in runs] == [[0, 2], [2, 4]]  # continued from step 2, not started afresh
    assert runs[-1]["config"]["free_bits"] == 64.0


def test_another_architecture_is_refused_not_restarted_over_the_weights(pop909_root, in_tmp):
    from cadenza.models.vae.train import train

    train(pop909_root, _opts(in_tmp), progress=False)
    before = (in_tmp / "w.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="dec_hidden"):
        train(pop909_root, _opts(in_tmp, max_steps=4, overrides={**TINY, "dec_hidden": 24}), progress=False)
    assert (in_tmp / "w.safetensors").read_bytes() == before


def test_init_from_adds_the_bar_skip_paths_keeps_the_step_and_restarts_the_lr(pop909_root, in_tmp):
    from cadenza.models.vae.train import ckpt_path, train
    from cadenza.models.vae.weights import read_meta

    two_level = {**TINY, "enc_bar_hidden": 8, "free_bits": 16.0}
    train(pop909_root, _opts(in_tmp, out=in_tmp / "a.safetensors", overrides=two_level), progress=False)
    src = ckpt_path("mel_2bar", in_tmp / "a.safetensors")

    grown = _opts(
        in_tmp, max_steps=4, out=in_tmp / "b.safetensors", init_from=src, overrides={**TINY, "enc_bar_hidden": 8, "bar_skip": True}
    )
    train(pop909_root, grown, progress=False)
    saved = torch.load(ckpt_path("mel_2bar", in_tmp / "b.safetensors"), weights_only=True)
    assert saved["config"]["bar_skip"] and saved["config"]["free_bits"] == 16.0  # loss settings carried over
    assert saved["state"]["step"] == 4 and saved["state"]["lr_origin"] == 2
    assert saved["optim"]["param_groups"][0]["lr"] == pytest.approx(grown.lr * grown.lr_decay)  # counted from step 2
    assert saved["model"]["encoder.skip.weight"].abs().sum() > 0  # it trained
    assert [r["steps"] for r in read_meta(in_tmp / "b.safetensors")["runs"]] == [[0, 2], [2, 4]]

    # another architecture is refused in one line, and so is --init-from over an existing checkpoint
    with pytest.raises(SystemExit, match="dec_hidden"):
        train(
            pop909_root,
            _opts(in_tmp, out=in_tmp / "c.safetensors", init_from=src, overrides={**two_level, "dec_hidden": 24}),
            progress=False,
        )
    with pytest.raises(SystemExit, match="exists"):
        train(pop909_root, grown, progress=False)
