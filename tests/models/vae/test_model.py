"""Model shapes, the hierarchical decoder's bar resets, and the KL / free-bits arithmetic."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from cadenza.models.vae.model import PRESETS, MusicVAE, kl_loss, kl_terms, sampling_prob  # noqa: E402


def _small(name):
    bar = 12 if PRESETS[name].enc_bar_hidden else 0
    return replace(PRESETS[name], z_dim=16, enc_hidden=32, enc_bar_hidden=bar, dec_hidden=32, cond_hidden=32, cond_dim=16, emb=8)


@pytest.mark.parametrize("name", ["mel_16bar", "mel_16bar_flat"])
def test_two_level_encoder_reads_each_bar_on_its_own(name):
    torch.manual_seed(0)
    m = MusicVAE(_small(name)).eval()
    x = torch.randint(0, m.cfg.vocab, (2, 256))
    y = x.clone()
    y[:, 16 * 5 + 7] = (y[:, 16 * 5 + 7] + 1) % m.cfg.vocab  # one event of bar 6
    bars_x, bars_y = m.encoder.read(x), m.encoder.read(y)
    assert bars_x.shape == (2, 16, 24)  # one vector per bar, both directions
    changed = (bars_x - bars_y).abs().amax(-1) > 1e-6
    assert changed[:, 5].all() and not changed[:, :5].any() and not changed[:, 6:].any()
    mu_x, _ = m.encode(x)
    mu_y, sigma = m.encode(y)
    assert mu_x.shape == sigma.shape == (2, 16) and not torch.allclose(mu_x, mu_y)


def test_hierarchical_shapes_and_bar_reset():
    torch.manual_seed(0)
    m = MusicVAE(_small("mel_16bar")).eval()
    x = torch.randint(0, m.cfg.vocab, (3, 256))
    z = torch.randn(3, 16)
    assert m.decoder.bar_embeddings(z).shape == (3, 16, 16)
    lg = m.decoder(z, x)
    assert lg.shape == (3, 256, m.cfg.vocab)
    y = x.clone()
    y[:, 16 * 5 : 16 * 6] = (y[:, 16 * 5 : 16 * 6] + 1) % m.cfg.vocab  # change bar 6 only
    lg2 = m.decoder(z, y)
    same = (lg - lg2).abs().amax(-1) < 1e-6
    assert same[:, : 16 * 5 + 1].all()  # up to bar 6's first step (its input is the start token)
    assert not same[:, 16 * 5 + 1 : 16 * 6].all()
    assert same[:, 16 * 6 :].all()  # bar 7 on: the state was reset, nothing leaks across the bar line
    assert m.decode(z, 0.0).shape == (3, 256)
    assert m.decode(z, 1.0).shape == (3, 256)


def test_bar_skip_paths_start_at_zero_then_learn():
    """Adding the bar_skip paths to a trained 16-bar model changes nothing until training moves
    them, and training does move them (their gradient is not zero)."""
    torch.manual_seed(0)
    plain = MusicVAE(replace(_small("mel_16bar"), bar_skip=False))
    grown = MusicVAE(replace(plain.cfg, bar_skip=True))
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".skip" in k for k in missing)
    x = torch.randint(0, plain.cfg.vocab, (3, 256))
    plain.eval(), grown.eval()
    for a, b in zip(plain.encode(x), grown.encode(x)):
        assert torch.equal(a, b)
    z = torch.randn(3, 16)
    assert torch.equal(plain.decoder(z, x), grown.decoder(z, x))
    grown.train()
    grown(x, 0.0, 0.2)["loss"].backward()
    assert grown.encoder.skip.weight.grad.abs().sum() > 0
    assert grown.decoder.skip.weight.grad.abs().sum() > 0


def test_bar_skip_reaches_every_bar_embedding_from_z():
    torch.manual_seed(0)
    m = MusicVAE(replace(_small("mel_16bar"), bar_skip=True)).eval()
    with torch.no_grad():
        m.decoder.skip.weight.normal_()
    z = torch.randn(2, 16)
    dz = z.clone()
    dz[:, 3] += 1.0
    moved = (m.decoder.bar_embeddings(z) - m.decoder.bar_embeddings(dz)).abs().amax(-1)
    assert (moved > 1e-4).all()


def test_flat_decoder_carries_state_across_bars():
    torch.manual_seed(0)
    m = MusicVAE(_small("mel_16bar_flat")).eval()
    x = torch.randint(0, m.cfg.vocab, (2, 256))
    z = torch.randn(2, 16)
    y = x.clone()
    y[:, 80:96] = (y[:, 80:96] + 1) % m.cfg.vocab
    diff = (m.decoder(z, x) - m.decoder(z, y)).abs().amax(-1)
    assert (diff[:, 97:] > 1e-6).any()


def test_kl_and_free_bits_by_hand():
    mu = torch.tensor([[1.0, 0.0]])
    sigma = torch.tensor([[1.0, 0.5]])
    # per dim: 0.5 (mu^2 + sigma^2 - 1) - log sigma
    d0 = 0.5 * (1 + 1 - 1) - 0.0
    d1 = 0.5 * (0 + 0.25 - 1) - math.log(0.5)
    kl = kl_terms(mu, sigma)
    assert kl[0, 0].item() == pytest.approx(d0) and kl[0, 1].item() == pytest.approx(d1, rel=1e-6)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(kl, ref, atol=1e-6)
    total = kl.sum(1)
    assert kl_loss(total, free_bits=0.5, beta=0.2).item() == pytest.approx(0.2 * (d0 + d1 - 0.5), rel=1e-6)
    assert kl_loss(total, free_bits=1.0, beta=0.2).item() == 0.0  # under the free bits: no penalty
    # free bits apply to the total, not per dim: per-dim would give 0.2 * (max(d0 - .25, 0) + max(d1 - .25, 0))
    assert kl_loss(total, free_bits=0.5, beta=0.2).item() != pytest.approx(0.2 * ((d0 - 0.25) + (d1 - 0.25)) + 0.01)


def test_training_step_and_schedule():
    assert sampling_prob(0, 300) < 0.01 and 0.4 < sampling_prob(int(300 * math.log(300)), 300) < 0.6 and sampling_prob(10**6, 300) > 0.99
    torch.manual_seed(0)
    m = MusicVAE(_small("mel_2bar"))
    x = torch.randint(0, m.cfg.vocab, (4, 32))
    for sp in (0.0, 0.5):
        o = m(x, sample_p=sp, beta=0.1)
        assert o["logits"].shape == (4, 32, m.cfg.vocab)
        o["loss"].backward()


@pytest.mark.parametrize("name", ["mel_2bar", "mel_16bar"])
def test_fast_generation_matches_the_lstm(name):
    """The written-out LSTM cell of generate() against nn.LSTM: teacher-forcing the greedy output
    reproduces it (argmax at every step) and the same logits."""
    torch.manual_seed(1)
    m = MusicVAE(_small(name)).eval()
    z = torch.randn(5, 16) * 3
    with torch.no_grad():
        y = m.decode(z, 0.0, constrain=False)
        lg = m.decoder(z, y)
    assert torch.equal(lg.argmax(-1), y)
