"""The causal velocity model: a GRU over the note sequence, one step per note-on.

At a note-on it sees the note's causal features (its past only, see ``velocity_features``) and
its recurrent state; it answers the velocity at once. The same weights run over a whole piece at
training time (``forward``) and one note at a time live (``step``), so live and file results are
the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cadenza.stream.smf import Performance

from .velocity_features import N_FEATURES, causal_features
from .velocity_weights import load_model


@dataclass
class CausalConfig:
    n_features: int = N_FEATURES
    hidden: int = 256
    head: int = 128


class CausalVelocityModel(nn.Module):
    """Features (B, T, F) -> velocities (B, T); state (B, hidden), batch along dim 0."""

    state_batch_dim = 0  # the engine concatenates/narrows sessions' states along this dim

    def __init__(self, cfg: CausalConfig = CausalConfig()):
        super().__init__()
        self.cfg = cfg
        self.n_features = cfg.n_features
        self.register_buffer("feat_mean", torch.zeros(cfg.n_features))
        self.register_buffer("feat_std", torch.ones(cfg.n_features))
        self.inp = nn.Linear(cfg.n_features, cfg.hidden)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.head), nn.GELU(), nn.Linear(cfg.head, 1))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.inp((x - self.feat_mean) / self.feat_std))

    def _out(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # Velocity around the repertoire's middle; the head predicts a scaled offset.
        return 64.0 + 32.0 * self.head(torch.cat([h, e], -1)).squeeze(-1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, F) -> (velocities (B, T) unclipped, hidden (B, T, H))."""
        e = self._embed(x)
        h, _ = self.gru(e, None if state is None else state.unsqueeze(0))
        return self._out(h, e), h

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.cfg.hidden, device=self.feat_mean.device)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One note-on per row: x (B, F), state (B, H) -> (velocities (B,) in [1, 127], new state)."""
        with torch.inference_mode():
            e = self._embed(x)
            g = self.gru
            h = torch.gru_cell(e, state, g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
            return self._out(h, e).clamp(1.0, 127.0), h


def load_causal(path: Path | None = None, device: str = "cpu") -> CausalVelocityModel:
    """The shipped (or given) causal model, in eval mode and warmed up."""
    model = load_model("causal", CausalVelocityModel, CausalConfig, path, device)
    with torch.inference_mode():  # first calls allocate; do it before the first real note
        s = model.initial_state(1)
        for _ in range(3):
            _, s = model.step(torch.zeros(1, model.n_features, device=device), s)
    return model


def predict_causal(model: CausalVelocityModel, perf: Performance, features: np.ndarray | None = None) -> np.ndarray:
    """(N,) float velocities of a whole piece, each from its past only."""
    if len(perf) == 0:
        return np.zeros(0)
    x = causal_features(perf) if features is None else features
    with torch.inference_mode():
        v, _ = model(torch.from_numpy(np.asarray(x, np.float32))[None])
    return v[0].clamp(1.0, 127.0).numpy().astype(np.float64)


def config_dict(model: CausalVelocityModel) -> dict:
    return asdict(model.cfg)
