"""MusicVAE models in PyTorch: a bidirectional LSTM encoder and a flat or hierarchical LSTM decoder.

* ``Encoder``: embedding -> bidirectional LSTM -> final states of both directions -> mu, sigma
  (sigma = softplus of a linear layer, as in Magenta). With ``enc_bar_hidden`` set (the 16-bar
  models) it reads in two levels: a bidirectional LSTM over each bar's 16 sixteenths (all bars as
  one batch) gives one vector per bar, and the bidirectional LSTM runs over those 16 vectors. The
  paper's encoder is one BiLSTM over all 256 steps; on a CPU those 256 sequential steps are most of
  a training step, and the two-level reader needs 16 + 16, so the 16-bar models get more training
  in the same hours (measured in ``docs/vae.md``). With ``bar_skip`` the bar vectors also reach
  mu and sigma through a linear layer: the BiLSTM's two final states remember the first and last
  bars best, and the middle bars were reconstructed worst (per-bar accuracy in ``docs/vae.md``).
* ``FlatDecoder`` (mel_2bar, mel_16bar_flat): z -> tanh(linear) = initial LSTM state; every input is
  [embedding of the previous event, z].
* ``HierDecoder`` (mel_16bar): a conductor LSTM, its state initialised from z and its inputs zeros,
  emits one embedding c_u per bar; the bottom decoder generates bar u from c_u: its state is
  reset to tanh(linear(c_u)) at every bar, its first input is a start token and every input is
  [embedding of the previous event, c_u]. Bars are independent given c, so they run as one batch.
  With ``bar_skip`` each c_u also gets a linear map of z of its own (bar u's row block), so what z
  holds about a middle bar does not have to survive the conductor's recurrence to reach it.
  The skip layers start at zero: added to a trained model they leave it unchanged and then learn
  (``cadenza train vae --init-from``).
* Scheduled sampling: with probability ``sample_p`` each step's input is the decoder's own
  sample instead of the true previous event (``sample_p`` follows an inverse-sigmoid schedule;
  below 1 % the step is plain teacher forcing, which runs as one fused LSTM call).
* Loss: cross entropy (sum over steps) + beta * max(KL - free_bits, 0), KL summed over all
  z dims (Magenta's free bits on the total KL, in nats).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import NOTE_OFF, STEPS_PER_BAR, VOCAB

SKIP_DIM = 32  # per-bar width of the encoder's bar_skip path
START = VOCAB  # extra input token at step 0 (and at each bar start in the hierarchical decoder)


@dataclass
class VAEConfig:
    name: str = "mel_2bar"
    n_bars: int = 2
    hierarchical: bool = False
    z_dim: int = 128
    emb: int = 32
    enc_hidden: int = 256
    enc_layers: int = 1
    enc_bar_hidden: int = 0  # > 0: two-level encoder, a BiLSTM of this width per bar first
    dec_hidden: int = 256
    dec_layers: int = 2
    cond_hidden: int = 256
    cond_dim: int = 128  # bar embedding size (hierarchical)
    bar_skip: bool = False  # 16-bar models: bar vectors -> mu/sigma and z -> each bar embedding, linear
    free_bits: float = 48.0  # nats, on the total KL
    max_beta: float = 0.2
    beta_rate: float = 0.999  # beta = max_beta * (1 - beta_rate ** step)
    sampling_rate: float = 300.0  # inverse-sigmoid k
    vocab: int = VOCAB

    @property
    def steps(self) -> int:
        return self.n_bars * STEPS_PER_BAR

    def to_dict(self) -> dict:
        return asdict(self)


_MEL_16BAR = VAEConfig(
    name="mel_16bar",
    n_bars=16,
    hierarchical=True,
    z_dim=256,
    enc_hidden=256,
    enc_bar_hidden=128,
    dec_hidden=192,
    dec_layers=1,
    cond_hidden=256,
    cond_dim=128,
    bar_skip=True,  # added at step 22,238 of the shipped model's training (docs/vae.md)
    free_bits=256.0,  # nats for 16 bars, as Magenta's hierdec-mel_16bar
    sampling_rate=1000.0,  # own samples from ~5k steps on, after teacher forcing has taught the decoder melodies
)

PRESETS = {
    "mel_2bar": VAEConfig(),
    "mel_16bar": _MEL_16BAR,
    # the flat baseline differs in its decoder: the same bottom LSTM (192, one layer) over all 256
    # steps, no conductor; encoder, z and training recipe are the hierarchical model's, without the
    # bar_skip paths (its shipped weights were trained before they existed)
    "mel_16bar_flat": replace(_MEL_16BAR, name="mel_16bar_flat", hierarchical=False, bar_skip=False),
}


def zero_linear(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer that starts as the zero map (a path added to a trained model changes nothing
    until training moves it; its input is non-zero, so its gradient is not)."""
    lin = nn.Linear(n_in, n_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def sampling_prob(step: int, k: float) -> float:
    """Inverse sigmoid: probability of feeding the model's own sample at training step ``step``."""
    if k <= 0:
        return 0.0
    return 1.0 - k / (k + math.exp(min(step / k, 50.0)))


def beta_at(step: int, cfg: VAEConfig) -> float:
    return cfg.max_beta * (1.0 - cfg.beta_rate**step)


def kl_terms(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) per dim, nats: 0.5 (mu^2 + sigma^2 - 1) - log sigma."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0) - torch.log(sigma)


def kl_loss(kl_total: torch.Tensor, free_bits: float, beta: float) -> torch.Tensor:
    """beta * max(KL_total - free_bits, 0) per example (free bits on the total KL, Magenta style)."""
    return beta * torch.clamp(kl_total - free_bits, min=0.0)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab, cfg.emb)
        inp = cfg.emb
        self.bar_rnn = None
        if cfg.enc_bar_hidden:
            self.bar_rnn = nn.LSTM(cfg.emb, cfg.enc_bar_hidden, batch_first=True, bidirectional=True)
            inp = 2 * cfg.enc_bar_hidden
        self.rnn = nn.LSTM(inp, cfg.enc_hidden, num_layers=cfg.enc_layers, batch_first=True, bidirectional=True)
        self.mu = nn.Linear(2 * cfg.enc_hidden, cfg.z_dim)
        self.sig = nn.Linear(2 * cfg.enc_hidden, cfg.z_dim)
        self.skip = None
        if cfg.bar_skip:
            if not cfg.enc_bar_hidden:
                raise ValueError("bar_skip needs the two-level encoder (enc_bar_hidden > 0)")
            # each bar vector squeezed to SKIP_DIM first: 16 x 256 inputs straight to 2 z_dim outputs
            # would be 2 M weights, more than the rest of the model
            self.skip_bar = nn.Linear(2 * cfg.enc_bar_hidden, SKIP_DIM)
            self.skip = zero_linear(cfg.n_bars * SKIP_DIM, 2 * cfg.z_dim)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """What the top BiLSTM reads: the events' embeddings (B, T, emb), or with the two-level
        encoder one vector per bar (B, U, 2 enc_bar_hidden), each bar read on its own."""
        e = self.emb(x)
        if self.bar_rnn is None:
            return e
        B, T = x.shape
        _, (hb, _) = self.bar_rnn(e.reshape(B * (T // STEPS_PER_BAR), STEPS_PER_BAR, -1))
        return torch.cat([hb[-2], hb[-1]], -1).reshape(B, T // STEPS_PER_BAR, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bars = self.read(x)
        _, (h, _) = self.rnn(bars)
        h = torch.cat([h[-2], h[-1]], dim=-1)  # last layer, forward and backward
        mu, sig = self.mu(h), self.sig(h)
        if self.skip is not None:
            dmu, dsig = self.skip(torch.tanh(self.skip_bar(bars)).flatten(1)).chunk(2, -1)
            mu, sig = mu + dmu, sig + dsig
        return mu, F.softplus(sig) + 1e-4


class _StepLSTM(nn.Module):
    """An LSTM decoder over sequences conditioned on a vector c: state from c, c on every input."""

    def __init__(self, cfg: VAEConfig, cond: int, hidden: int, layers: int):
        super().__init__()
        self.layers, self.hidden = layers, hidden
        self.emb = nn.Embedding(cfg.vocab + 1, cfg.emb)
        self.init = nn.Linear(cond, 2 * layers * hidden)
        self.rnn = nn.LSTM(cfg.emb + cond, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, cfg.vocab)

    def state(self, c: torch.Tensor):
        s = torch.tanh(self.init(c)).view(c.shape[0], 2, self.layers, self.hidden).permute(1, 2, 0, 3)
        return s[0].contiguous(), s[1].contiguous()

    def forward(self, c: torch.Tensor, target: torch.Tensor, sample_p: float = 0.0) -> torch.Tensor:
        """Logits (B, T, V) for ``target`` (B, T), teacher forced except for scheduled samples."""
        B, T = target.shape
        prev = torch.cat([torch.full((B, 1), START, dtype=target.dtype, device=target.device), target[:, :-1]], 1)
        state = self.state(c)
        if sample_p < 0.01:  # (almost) pure teacher forcing: one fused LSTM call
            sample_p = 0.0
            inp = torch.cat([self.emb(prev), c.unsqueeze(1).expand(B, T, c.shape[-1])], -1)
            y, _ = self.rnn(inp, state)
            return self.out(y)
        logits, tok = [], prev[:, :1]
        for t in range(T):
            if t > 0:
                own = torch.multinomial(F.softmax(logits[-1].detach()[:, 0], -1), 1)
                use = torch.rand(B, 1, device=c.device) < sample_p
                tok = torch.where(use, own, prev[:, t : t + 1])
            y, state = self.rnn(torch.cat([self.emb(tok), c.unsqueeze(1)], -1), state)
            logits.append(self.out(y))
        return torch.cat(logits, 1)

    @torch.no_grad()
    def generate(
        self,
        c: torch.Tensor,
        T: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        constrain: bool = True,
        start_sounding: bool = False,
    ) -> torch.Tensor:
        """Events (B, T), each step's input the previous output; temperature 0 = greedy.

        ``constrain``: no note-off while no note sounds (a no-op event the data never holds); at
        the start nothing sounds, unless ``start_sounding`` (a bar of a longer melody: unknown)."""
        B = c.shape[0]
        h, cs = self.state(c)
        h, cs = list(h.unbind(0)), list(cs.unbind(0))
        # the LSTM cell written out with nn.LSTM's own weights (gates i, f, g, o): per step a few small
        # matmuls instead of an nn.LSTM call; the embedding and the constant c are projected once
        W = [
            (
                getattr(self.rnn, f"weight_ih_l{k}"),
                getattr(self.rnn, f"weight_hh_l{k}"),
                getattr(self.rnn, f"bias_ih_l{k}") + getattr(self.rnn, f"bias_hh_l{k}"),
            )
            for k in range(self.layers)
        ]
        E = self.emb.weight.shape[1]
        tok_proj = self.emb.weight @ W[0][0][:, :E].T  # (V + 1, 4H)
        c_proj = c @ W[0][0][:, E:].T + W[0][2]  # (B, 4H)
        tok = torch.full((B,), START, dtype=torch.long, device=c.device)
        sounding = torch.full((B,), bool(start_sounding), device=c.device)
        out = []
        for _ in range(T):
            x = None
            for k in range(self.layers):
                wi, wh, b = W[k]
                g = (tok_proj[tok] + c_proj if k == 0 else torch.addmm(b, x, wi.T)) + h[k] @ wh.T
                i, f, gg, o = g.chunk(4, 1)
                cs[k] = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(gg)
                h[k] = x = torch.sigmoid(o) * torch.tanh(cs[k])
            lg = self.out(x)
            if constrain:
                lg[:, NOTE_OFF] = lg[:, NOTE_OFF].masked_fill(~sounding, float("-inf"))
            if temperature <= 0:
                tok = lg.argmax(-1)
            else:
                tok = torch.multinomial(F.softmax(lg / temperature, -1), 1, generator=generator)[:, 0]
            sounding = torch.where(tok >= 2, True, torch.where(tok == NOTE_OFF, False, sounding))
            out.append(tok)
        return torch.stack(out, 1)


class FlatDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.dec = _StepLSTM(cfg, cfg.z_dim, cfg.dec_hidden, cfg.dec_layers)

    def forward(self, z, target, sample_p=0.0):
        return self.dec(z, target, sample_p)

    def generate(self, z, temperature=1.0, generator=None, constrain=True):
        return self.dec.generate(z, self.cfg.steps, temperature, generator, constrain)


class HierDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.c_init = nn.Linear(cfg.z_dim, 2 * cfg.cond_hidden)
        self.conductor = nn.LSTM(1, cfg.cond_hidden, batch_first=True)
        self.c_out = nn.Linear(cfg.cond_hidden, cfg.cond_dim)
        self.skip = zero_linear(cfg.z_dim, cfg.n_bars * cfg.cond_dim) if cfg.bar_skip else None
        self.dec = _StepLSTM(cfg, cfg.cond_dim, cfg.dec_hidden, cfg.dec_layers)

    def bar_embeddings(self, z: torch.Tensor) -> torch.Tensor:
        """(B, n_bars, cond_dim): the conductor's output for every bar."""
        B, U = z.shape[0], self.cfg.n_bars
        h, c = torch.tanh(self.c_init(z)).unsqueeze(0).chunk(2, -1)
        y, _ = self.conductor(z.new_zeros(B, U, 1), (h.contiguous(), c.contiguous()))
        pre = self.c_out(y)
        if self.skip is not None:
            pre = pre + self.skip(z).view(B, U, -1)
        return torch.tanh(pre)

    def forward(self, z, target, sample_p=0.0):
        B, T = target.shape
        U = self.cfg.n_bars
        cu = self.bar_embeddings(z).reshape(B * U, -1)
        lg = self.dec(cu, target.reshape(B * U, STEPS_PER_BAR), sample_p)  # bar reset: each bar its own sequence
        return lg.reshape(B, T, -1)

    def generate(self, z, temperature=1.0, generator=None, constrain=True):
        B, U = z.shape[0], self.cfg.n_bars
        cu = self.bar_embeddings(z).reshape(B * U, -1)
        # bars run in parallel, so whether a note sounds into a bar is unknown while it is generated:
        # bar starts allow a note-off, and one that ends nothing (a no-op) is then dropped by tidy
        ev = self.dec.generate(cu, STEPS_PER_BAR, temperature, generator, constrain, start_sounding=True).reshape(B, -1)
        return tidy(ev) if constrain else ev


class MusicVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = HierDecoder(cfg) if cfg.hierarchical else FlatDecoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, sample_p: float = 0.0, beta: float = 0.0, generator=None) -> dict:
        mu, sigma = self.encoder(x)
        z = mu + sigma * torch.randn(mu.shape, generator=generator, device=mu.device)
        logits = self.decoder(z, x, sample_p)
        rec = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="none").view(x.shape).sum(1)
        kl = kl_terms(mu, sigma).sum(1)
        loss = rec + kl_loss(kl, self.cfg.free_bits, beta)
        acc = (logits.argmax(-1) == x).float().mean()
        return {"loss": loss.mean(), "rec": rec.mean(), "kl": kl.mean(), "acc": acc, "mu": mu, "logits": logits}

    @torch.no_grad()
    def decode(self, z: torch.Tensor, temperature: float = 1.0, generator=None, constrain: bool = True) -> torch.Tensor:
        return self.decoder.generate(z, temperature, generator, constrain)


def tidy(ev: torch.Tensor) -> torch.Tensor:
    """Note-offs while nothing sounds (no-ops) become "no event"; (B, T) in, a new tensor out."""
    ev = ev.clone()
    sounding = torch.zeros(ev.shape[0], dtype=torch.bool)
    for t in range(ev.shape[1]):
        e = ev[:, t]
        stray = (e == NOTE_OFF) & ~sounding
        ev[:, t] = torch.where(stray, torch.zeros_like(e), e)
        sounding = torch.where(e >= 2, True, torch.where(e == NOTE_OFF, False, sounding))
    return ev


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
