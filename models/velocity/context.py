"""The full-context velocity model: causal GRU backbone + a horizon-masked attention readout.

Note i's velocity may depend on notes with onset <= t_i + S (S = the lookahead; inf offline).
Stacking attention layers with such a mask leaks (i sees j, j saw t_j + S, ...), so only the
backbone is recurrent — and strictly causal, so each state h_j depends on notes up to j alone —
and one readout layer attends, for note i, over the states of its neighbours j in
[i - PAST, i + FUTURE] with onset <= t_i + S. Pairwise features give the readout what is known
at the horizon: relative time and pitch, and each neighbour's duration cut at t_i + S (a key
still held at the horizon looks the same whatever its real length). One set of weights serves
every lookahead: training draws S per segment from ``LOOKAHEADS_TRAIN``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cadenza.midifile import Performance
from cadenza.models.velocity.features import N_FEATURES, causal_features
from cadenza.models.velocity.weights import load_model

LOOKAHEADS_TRAIN = np.array([0.0, 0.1, 0.25, 0.5, 1.0, 2.0, math.inf, math.inf])
N_PAIR = 11
# Queries per readout call. The readout is dense over keys [lo - past, hi + future) under a band
# mask, so a chunk of c queries computes c * (c + past + future) pairs for c * (past + future + 1)
# useful ones; smaller chunks pay per-call overhead instead. 64 was the fastest size on a CPU
# (`cadenza bench colorize` times the context model over the test split).
READOUT_CHUNK = 64


@dataclass
class ContextConfig:
    n_features: int = N_FEATURES
    hidden: int = 256
    head: int = 128
    dim: int = 64  # attention width
    heads: int = 4
    past: int = 32  # neighbours looked at, notes back
    future: int = 64  # and forward


class ContextVelocityModel(nn.Module):
    def __init__(self, cfg: ContextConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else ContextConfig()  # a fresh config per model: a shared default would be shared state
        self.cfg = cfg
        self.n_features = cfg.n_features
        H, D = cfg.hidden, cfg.dim
        self.register_buffer("feat_mean", torch.zeros(cfg.n_features))
        self.register_buffer("feat_std", torch.ones(cfg.n_features))
        # Same names as the causal model, so its weights can initialise the backbone.
        self.inp = nn.Linear(cfg.n_features, H)
        self.gru = nn.GRU(H, H, batch_first=True)
        self.kv = nn.Linear(H, 2 * D)
        self.pair_bias = nn.Linear(N_PAIR, cfg.heads)  # linear: a per-pair MLP costs more than the rest
        self.q = nn.Linear(2 * H, D)
        self.out = nn.Sequential(nn.Linear(2 * H + D + cfg.heads * N_PAIR, cfg.head), nn.GELU(), nn.Linear(cfg.head, 1))

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, F) -> (states (B, T, H), embeddings (B, T, H)); causal."""
        e = torch.relu(self.inp((x - self.feat_mean) / self.feat_std))
        h, _ = self.gru(e)
        return h, e

    def readout(self, h, e, onset, offset, pitch, seconds, lo: int = 0, hi: int | None = None, hidden: bool = False):
        """Velocities (B, hi-lo) of notes lo..hi-1, from states (B, T, H) and note arrays (B, T).

        ``onset``/``offset`` are float64 seconds (offset = inf for a key not yet released),
        ``seconds`` (B,) the lookahead per row (inf = whole piece). Queries lo..hi-1 attend to
        keys klo..khi-1 densely (one matrix product) under a band mask; that is much faster on a
        CPU than gathering a neighbour window per note. ``hidden=True`` also returns the output
        layer's hidden activations (B, hi-lo, head), what the offline refiner builds on.
        """
        B, T, _ = h.shape
        hi = T if hi is None else hi
        cfg = self.cfg
        klo, khi = max(0, lo - cfg.past), min(T, hi + cfg.future)
        o = torch.arange(klo, khi, device=h.device)[None, :] - torch.arange(lo, hi, device=h.device)[:, None]  # (n, m)
        band = (o >= -cfg.past) & (o <= cfg.future)
        t_i = onset[:, lo:hi, None]  # (B, n, 1) float64
        t_j = onset[:, None, klo:khi]  # (B, 1, m)
        horizon = t_i + seconds.to(torch.float64)[:, None, None]
        allowed = band[None] & ((o <= 0)[None] | ((seconds[:, None, None] > 0) & (t_j <= horizon)))
        off_j = offset[:, None, klo:khi]
        dt = (t_j - t_i).to(torch.float32)  # (B, n, m)
        known = (torch.minimum(off_j, horizon) - t_j).clamp(min=0).to(torch.float32)
        released = (off_j <= horizon).to(torch.float32)
        dp = (pitch[:, None, klo:khi] - pitch[:, lo:hi, None]) / 24.0
        of = o.to(torch.float32).expand_as(dt)
        pair = torch.stack(
            [
                torch.sign(dt) * torch.log1p(dt.abs() / 0.05) / 4.0,
                dp,
                torch.log(known.clamp(max=10.0) + 0.01) / 3.0,
                released,
                of / cfg.future,
                (of == 0).to(torch.float32),
                (dt.abs() < 0.03).to(torch.float32),
                dp.abs() * 2.0,
                (dp > 0).to(torch.float32),
                (dt > 0).to(torch.float32),
                torch.log1p(torch.nan_to_num(horizon - t_i, posinf=10.0).clamp(max=10.0).to(torch.float32)).expand_as(dt),
            ],
            -1,
        )  # (B, n, m, N_PAIR)
        nh, dh = cfg.heads, cfg.dim // cfg.heads
        k, v = self.kv(h[:, klo:khi]).view(B, -1, 2 * nh, dh).transpose(1, 2).chunk(2, 1)  # (B, h, m, dh)
        q = self.q(torch.cat([h[:, lo:hi], e[:, lo:hi]], -1)).view(B, -1, nh, dh).transpose(1, 2)  # (B, h, n, dh)
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh) + self.pair_bias(pair).permute(0, 3, 1, 2)  # (B, h, n, m)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.softmax(logits, -1)
        ctx = (att @ v).transpose(1, 2).reshape(B, -1, cfg.dim)  # (B, n, D)
        # What the neighbours' pair features say (durations known at the horizon, ...), averaged
        # with the attention weights of all heads: (B, n, h, m) @ (B, n, m, P).
        pctx = (att.transpose(1, 2) @ pair).reshape(B, -1, nh * N_PAIR)
        z = self.out[1](self.out[0](torch.cat([h[:, lo:hi], e[:, lo:hi], ctx, pctx], -1)))
        v = 64.0 + 32.0 * self.out[2](z).squeeze(-1)
        return (v, z) if hidden else v

    def forward(self, x, onset, offset, pitch, seconds) -> torch.Tensor:
        h, e = self.backbone(x)
        return self.readout(h, e, onset, offset, pitch, seconds)


def load_context(path: Path | None = None, device: str = "cpu") -> ContextVelocityModel:
    return load_model("context", ContextVelocityModel, ContextConfig, path, device)


def _predict(model, x: np.ndarray, onset, offset, pitch, seconds: float) -> np.ndarray:
    """One piece at one lookahead."""
    return predict_context_many(model, [np.asarray(x, np.float32)], [onset], [offset], [pitch], [seconds])[0][0]


def predict_lookahead(model: ContextVelocityModel, perf: Performance, seconds: float, features: np.ndarray | None = None) -> np.ndarray:
    """(N,) velocities, note i from the notes with onset <= t_i + seconds only."""
    x = causal_features(perf) if features is None else features
    return _predict(model, x, perf.onset, perf.offset, perf.pitch, seconds)


def predict_offline(model: ContextVelocityModel, perf: Performance, features: np.ndarray | None = None) -> np.ndarray:
    return predict_lookahead(model, perf, math.inf, features)


def predict_window(
    model: ContextVelocityModel,
    features: np.ndarray,
    onset: np.ndarray,
    offset: np.ndarray,
    pitch: np.ndarray,
    seconds: float,
    targets: np.ndarray,
) -> np.ndarray:
    """For the engine: velocities of the notes ``targets`` (indices) of a window of recent notes.

    ``features`` are the notes' causal features (``LiveVelocityFeatures``), ``offset`` = inf
    for keys not yet released. Each target sees only window notes with onset <= its onset +
    ``seconds``; the engine calls this once the horizon of the targets has passed.
    """
    v = _predict(model, features, onset, np.where(np.isnan(offset), np.inf, offset), pitch, seconds)
    return v[np.asarray(targets)]


def readout_groups(model: ContextVelocityModel, features: list[np.ndarray], onset: list, offset: list, pitch: list, batch: int = 16):
    """Yield, per padded batch of pieces, ``[(k, read)]``: ``read(seconds)`` is piece k's readout
    (velocities (n,), unclamped) at that lookahead; ``read(seconds, hidden=True)`` is (n, 1 + head),
    (velocity - 64) / 32 beside the readout's hidden layer, what the offline refiner reads.
    Backbones run over padded batches of pieces (padding only trails, and the backbone is causal,
    so the result is exact); the readout runs per piece in chunks of ``READOUT_CHUNK`` notes.
    Call it under ``torch.inference_mode()``."""
    from cadenza.models.velocity.causal import padded, padded_batches

    model.eval()
    for ks in padded_batches([len(f) for f in features], batch):
        if len(features[ks[-1]]) == 0:
            continue
        h, e = model.backbone(padded(features, ks))
        group = []
        for r, k in enumerate(ks):
            n = len(features[k])
            if n == 0:
                continue
            on = torch.from_numpy(np.asarray(onset[k], np.float64))[None]
            off = torch.from_numpy(np.asarray(offset[k], np.float64))[None]
            p = torch.from_numpy(np.asarray(pitch[k], np.float32))[None]

            def read(sec: float, hidden: bool = False, h=h, e=e, r=r, n=n, on=on, off=off, p=p) -> torch.Tensor:
                st = torch.tensor([float(sec)])
                parts = [
                    model.readout(h[r : r + 1, :n], e[r : r + 1, :n], on, off, p, st, lo, min(lo + READOUT_CHUNK, n), hidden=hidden)
                    for lo in range(0, n, READOUT_CHUNK)
                ]
                if not hidden:
                    return torch.cat(parts, 1)[0]
                v = torch.cat([a for a, _ in parts], 1)[0]
                return torch.cat([((v - 64.0) / 32.0)[:, None], torch.cat([z for _, z in parts], 1)[0]], 1)

            group.append((k, read))
        yield group


def predict_context_many(
    model: ContextVelocityModel,
    features: list[np.ndarray],
    onset: list,
    offset: list,
    pitch: list,
    seconds: list[float],
    batch: int = 16,
    refiner=None,
) -> list[list[np.ndarray]]:
    """Many pieces at several lookaheads: ``out[s][k]`` is piece k at ``seconds[s]`` (see
    :func:`readout_groups`). With a ``refiner`` (``velocity_refine``), the offline (``inf``)
    results go through it, a padded batch at a time."""
    from cadenza.models.velocity.refine import refine_many

    out: list[list] = [[np.zeros(0)] * len(features) for _ in seconds]
    with torch.inference_mode():
        for group in readout_groups(model, features, onset, offset, pitch, batch):
            to_refine: dict[int, tuple[int, torch.Tensor]] = {}  # piece -> (lookahead index, refiner input)
            for k, read in group:
                for si, sec in enumerate(seconds):
                    if refiner is not None and math.isinf(sec):
                        to_refine[k] = (si, read(sec, hidden=True))
                    else:
                        out[si][k] = read(sec).clamp(1.0, 127.0).numpy().astype(np.float64)
            if to_refine:
                ids = list(to_refine)
                ys = refine_many(refiner, [to_refine[k][1] for k in ids], [features[k] for k in ids])
                for k, y in zip(ids, ys):
                    out[to_refine[k][0]][k] = y.clamp(1.0, 127.0).numpy().astype(np.float64)
    return out


def predict_split_context(model: ContextVelocityModel, data, seconds: float | list[float], batch: int = 16, refiner=None):
    """Every piece of a preprocessed split (``velocity_data.SplitData``) at one lookahead (a list
    of arrays) or at several (a list per lookahead)."""
    many = isinstance(seconds, (list, tuple))
    secs = list(seconds) if many else [seconds]
    pieces = [data.piece(k) for k in range(data.n_pieces)]
    out = predict_context_many(
        model,
        [data.features[s] for s in pieces],
        [data.onset[s] for s in pieces],
        [data.offset[s] for s in pieces],
        [data.pitch[s] for s in pieces],
        secs,
        batch,
        refiner,
    )
    return out if many else out[0]
