"""The causal velocity model: a GRU over the note sequence, one step per note-on.

At a note-on it sees the note's causal features (its past only, see ``velocity_features``) and
its recurrent state; it answers the velocity at once. The same weights run over a whole piece at
training time (``forward``) and one note at a time live (``step``), so live and file results are
the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cadenza.midifile import Performance
from cadenza.models.velocity.features import N_FEATURES, causal_features
from cadenza.models.velocity.weights import load_model


@dataclass
class CausalConfig:
    n_features: int = N_FEATURES
    hidden: int = 256
    head: int = 128


class CausalVelocityModel(nn.Module):
    """Features (B, T, F) -> velocities (B, T); state (B, hidden), batch along dim 0."""

    state_batch_dim = 0  # the engine concatenates/narrows sessions' states along this dim

    def __init__(self, cfg: CausalConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else CausalConfig()  # a fresh config per model: a shared default would be shared state
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


class NumpyCausalStep:
    """``CausalVelocityModel.step`` in plain numpy, for the live CPU path.

    At batch 1 the cost of a step is the number of array operations, not their arithmetic: each
    torch kernel and each numpy call pays a fixed dispatch cost (more when the caches are cold
    between notes), and numpy's is the smaller (``cadenza bench velocity`` times both forms side
    by side). So the constants are folded in advance — input
    normalisation into the first layer, GRU biases summed, the sigmoid's 1/2 into the r/z weights
    (sigmoid(x) = (1 + tanh(x/2)) / 2), the head's scale into its last layer — and GELU is
    ``a * Phi(a)`` with Phi read from a table by ``np.interp`` (|error| < 1e-6).

    The step is split so that the worker can put as little as possible between a note and its
    answer:

    * :meth:`inputs` — everything that depends on the note alone: the embedding and, in one
      product, both the GRU's input-side gates and the head's input-side half. A burst of notes
      (a chord, many sessions) shares one call.
    * :meth:`hidden_side` — everything that depends on the state alone (``h @ W_h``): the worker
      computes it right *after* a note has been answered, ready for the session's next note.
    * :meth:`recur` — the gates; :meth:`head` — the velocity from the new state.

    Velocities match the torch model to ~1e-4 (tests hold both forms to the file pass). States
    are numpy (B, H) arrays, batch along dim 0.
    """

    state_batch_dim = 0

    def __init__(self, model: CausalVelocityModel) -> None:
        f32 = np.float32
        sd = {k: v.detach().double().cpu().numpy() for k, v in model.state_dict().items()}
        H = self.hidden = model.cfg.hidden
        self.n_features = model.n_features
        w_in = sd["inp.weight"] / sd["feat_std"][None, :]  # (H, F)
        self.w_x = np.ascontiguousarray(w_in.T, f32)
        self.b_x = (sd["inp.bias"] - w_in @ sd["feat_mean"]).astype(f32)
        # Gates r, z, n. Pre-activations of r and z are halved (for the tanh form of the
        # sigmoid) and carry both biases; n's hidden-side part is halved too (see recur).
        half = np.ones(3 * H)
        half[: 2 * H] = 0.5
        b_g = sd["gru.bias_ih_l0"].copy()
        b_g[: 2 * H] += sd["gru.bias_hh_l0"][: 2 * H]
        w_1 = sd["head.0.weight"].T  # (2H, head) on [h, e]
        # e -> [input-side gates (3H) | the head's e half (head)], one product per burst
        self.w_e = np.ascontiguousarray(np.concatenate([sd["gru.weight_ih_l0"].T * half, w_1[H:]], 1), f32)
        self.b_e = np.concatenate([b_g * half, sd["head.0.bias"]]).astype(f32)
        self.w_h = np.ascontiguousarray(sd["gru.weight_hh_l0"].T * 0.5, f32)
        self.b_hn = (0.5 * sd["gru.bias_hh_l0"][2 * H :]).astype(f32)
        self.w_1h = np.ascontiguousarray(w_1[:H], f32)
        self.w_2 = np.ascontiguousarray(32.0 * sd["head.2.weight"][0], f32)
        self.b_2 = f32(64.0 + 32.0 * sd["head.2.bias"][0])

    def initial_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.hidden), np.float32)

    def inputs(self, x) -> np.ndarray:
        """The note-only part for any number of notes: x (N, F) -> (N, 3H + head): the GRU's
        input-side gate pre-activations, then the head's input-side pre-activation."""
        e = np.asarray(x, np.float32) @ self.w_x
        e += self.b_x
        np.maximum(e, 0.0, out=e)
        g = e @ self.w_e
        g += self.b_e
        return g

    def hidden_side(self, state: np.ndarray) -> np.ndarray:
        """The state-only part of the next GRU update: state (B, H) -> (B, 3H); consumed (written
        over) by :meth:`recur`."""
        gh = state @ self.w_h  # r, z halved; n halved: 0.5 * (W_hn h)
        gh[:, 2 * self.hidden :] += self.b_hn
        return gh

    def recur(self, g: np.ndarray, state: np.ndarray, gh: np.ndarray | None = None) -> np.ndarray:
        """One GRU update of B sessions: g (B, >= 3H) from :meth:`inputs`, state (B, H), and
        ``hidden_side(state)`` if it is already known -> new state."""
        H = self.hidden
        if gh is None:
            gh = self.hidden_side(state)
        ghn = gh[:, 2 * H :]
        t = gh[:, : 2 * H]
        t += g[:, : 2 * H]
        np.tanh(t, out=t)  # r = (1 + t_r) / 2, z = (1 + t_z) / 2
        # n = tanh(g_n + r * (W_hn h + b_hn)) = tanh(g_n + (1 + t_r) * ghn)
        n = t[:, :H] * ghn
        n += ghn
        n += g[:, 2 * H : 3 * H]
        np.tanh(n, out=n)
        # h' = n + z * (h - n)
        d = state - n
        z = t[:, H:]
        z += 1.0
        z *= 0.5
        d *= z
        d += n
        return d

    def head(self, h: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Velocities (N,) in [1, 127] from states after each note (N, H) and the notes'
        :meth:`inputs` (N, 3H + head)."""
        a = h @ self.w_1h
        a += g[:, 3 * self.hidden :]
        a *= np.interp(a, _PHI_X, _PHI_Y)  # GELU = a * Phi(a)
        v = a @ self.w_2
        v += self.b_2
        return np.clip(v, 1.0, 127.0, out=v)

    def step(self, x, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One note-on per row: x (B, F), state (B, H) -> (velocities (B,) in [1, 127], new state)."""
        g = self.inputs(x)
        h = self.recur(g, state)
        return self.head(h, g), h


# Phi, the standard normal CDF, tabulated for GELU (linear interpolation error < 1e-6; it is
# 0 or 1 to float32 precision outside the table, which is what np.interp returns there).
_PHI_X = np.linspace(-6.0, 6.0, 4097)
_PHI_Y = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in _PHI_X])


def load_causal(path: Path | None = None, device: str = "cpu") -> CausalVelocityModel:
    """The shipped (or given) causal model, in eval mode and warmed up."""
    model = load_model("causal", CausalVelocityModel, CausalConfig, path, device)
    with torch.inference_mode():  # first calls allocate; do it before the first real note
        s = model.initial_state(1)
        for _ in range(3):
            _, s = model.step(torch.zeros(1, model.n_features, device=device), s)
    return model


def load_causal_step(path: Path | None = None, device: str = "cpu", *, static: bool | None = None):
    """What the live worker steps: the numpy form on CPU; on a GPU the batched torch step on
    static buffers with CUDA graphs (:class:`~cadenza.models.velocity.static.StaticVelocityStep`).
    ``static=True`` forces the static form on any device (tests, ``cadenza bench device``);
    ``static=False`` gives the plain torch model off the CPU."""
    model = load_causal(path, device)
    if static is None:
        static = torch.device(device).type == "cuda"
    if static:
        from cadenza.models.velocity.static import StaticVelocityStep

        return StaticVelocityStep(model)
    if device != "cpu":
        return model
    step = NumpyCausalStep(model)
    s = step.initial_state(1)
    for _ in range(3):
        _, s = step.step(np.zeros((1, step.n_features), np.float32), s)
    return step


def predict_causal(model: CausalVelocityModel, perf: Performance, features: np.ndarray | None = None) -> np.ndarray:
    """(N,) float velocities of a whole piece, each from its past only."""
    if len(perf) == 0:
        return np.zeros(0)
    x = causal_features(perf) if features is None else features
    with torch.inference_mode():
        v, _ = model(torch.from_numpy(np.asarray(x, np.float32))[None])
    return v[0].clamp(1.0, 127.0).numpy().astype(np.float64)


def padded_batches(lengths, batch: int = 16, max_notes: int = 400_000):
    """Index groups for running sequences of these lengths as padded batches: shortest first,
    so that each batch pads little, at most ``batch`` rows and ``max_notes`` padded notes."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups, cur = [], []
    for k in order:
        if cur and (len(cur) >= batch or (len(cur) + 1) * int(lengths[k]) > max_notes):
            groups.append(cur)
            cur = []
        cur.append(int(k))
    if cur:
        groups.append(cur)
    return groups


def padded(features: list[np.ndarray], ks: list[int]) -> torch.Tensor:
    """(len(ks), longest, F) float32 with zero padding after each sequence (only trails: causal)."""
    n = max(len(features[k]) for k in ks)
    x = np.zeros((len(ks), n, features[ks[0]].shape[1]), np.float32)
    for r, k in enumerate(ks):
        x[r, : len(features[k])] = features[k]
    return torch.from_numpy(x)


def predict_causal_many(model: CausalVelocityModel, features: list[np.ndarray], batch: int = 16) -> list[np.ndarray]:
    """Velocities of many pieces (their causal features), run as padded batches: several pieces
    share each GRU step, which is what makes colorizing a folder fast on a CPU."""
    out: list[np.ndarray] = [np.zeros(0)] * len(features)
    model.eval()
    with torch.inference_mode():
        for ks in padded_batches([len(f) for f in features], batch):
            if len(features[ks[-1]]) == 0:
                continue
            v, _ = model(padded(features, ks))
            v = v.clamp(1.0, 127.0).numpy()
            for r, k in enumerate(ks):
                out[k] = v[r, : len(features[k])].astype(np.float64)
    return out


def config_dict(model: CausalVelocityModel) -> dict:
    return asdict(model.cfg)
