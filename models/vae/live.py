"""A small synchronous MusicVAE API for live use (``serve --mode vary`` on the bar grid).

    vae = load_vae("mel_2bar")                  # weights shipped in models/weights/
    z = vae.encode_steps(events)                # (T,) int events, T = 32 for mel_2bar -> (z_dim,) posterior mean
    out = vae.decode(z, temperature=0.5, seed=1) # -> (T,) int events
    out = vae.vary(events, amount=0.5, rng=np.random.default_rng())
    z_k = vae.morph(prev_z, z, k, K)            # k-th of K steps on the slerp path prev_z -> z
    z2 = vae.apply_attribute(z, "density", 1.0)
    notes = events_to_notes(out, step_s=60 / bpm / 4)  # [(t_on, t_off, pitch)], seconds from the window start

Events: one per sixteenth, 0 = no event, 1 = note-off, 2 + (pitch - 36) = note-on (MIDI 36..95);
``melody_to_events`` turns played notes into that grid. Everything runs on the calling thread, on
CPU, with torch no-grad; a 2-bar encode + decode takes a few milliseconds on one core
(`cadenza bench vae`). Not thread-safe: give each thread its own VAE.
"""

from __future__ import annotations

import numpy as np

from .data import HI, LO, NOTE_OFF, events_to_notes  # noqa: F401  (re-exported)

__all__ = ["VAE", "load_vae", "events_to_notes", "melody_to_events"]


class VAE:
    def __init__(self, model, meta: dict, attrs: dict):
        import torch

        self._torch = torch
        self.model = model
        self.meta = meta
        self.attrs = attrs
        self.cfg = model.cfg
        self.steps = model.cfg.steps
        self.z_dim = model.cfg.z_dim

    def _check(self, events) -> object:
        ev = np.asarray(events, dtype=np.int64).reshape(-1)
        if len(ev) != self.steps:
            raise ValueError(f"{self.cfg.name} takes {self.steps} sixteenths, got {len(ev)}")
        if ev.min() < 0 or ev.max() >= self.cfg.vocab:
            raise ValueError("event out of range")
        return self._torch.from_numpy(ev)[None]

    def encode_steps(self, events) -> np.ndarray:
        """Posterior mean of a melody, (z_dim,) float32."""
        with self._torch.inference_mode():
            mu, _ = self.model.encode(self._check(events))
        return mu[0].numpy()

    def decode(self, z, temperature: float = 0.5, seed: int | None = None) -> np.ndarray:
        """Events (T,) from z; temperature 0 = greedy."""
        t = self._torch
        g = t.Generator().manual_seed(int(seed)) if seed is not None else None
        with t.inference_mode():
            out = self.model.decode(t.as_tensor(np.asarray(z, np.float32))[None], float(temperature), g)
        return out[0].numpy()

    def sample_z(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.z_dim).astype(np.float32)

    def vary(self, events, amount: float, rng: np.random.Generator, temperature: float = 0.0) -> np.ndarray:
        """A variation: the melody's z plus ``amount`` times standard-normal noise, decoded."""
        z = self.encode_steps(events) + float(amount) * rng.standard_normal(self.z_dim).astype(np.float32)
        return self.decode(z, temperature, seed=int(rng.integers(1 << 31)))

    @staticmethod
    def morph(prev_z, z, k: int, K: int) -> np.ndarray:
        """The k-th of K points (k = 0..K) on the spherical path from prev_z to z."""
        a, b = np.asarray(prev_z, np.float64), np.asarray(z, np.float64)
        t = min(max(k / max(K, 1), 0.0), 1.0)
        na, nb = np.linalg.norm(a) + 1e-12, np.linalg.norm(b) + 1e-12
        om = np.arccos(np.clip(np.dot(a / na, b / nb), -1 + 1e-7, 1 - 1e-7))
        if om < 1e-4:
            return ((1 - t) * a + t * b).astype(np.float32)
        return ((np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)).astype(np.float32)

    def apply_attribute(self, z, name: str, amount: float) -> np.ndarray:
        if name not in self.attrs:
            raise KeyError(f"no attribute vector {name!r}; have {', '.join(sorted(self.attrs)) or 'none'}")
        return (np.asarray(z, np.float32) + float(amount) * self.attrs[name].numpy()).astype(np.float32)


_CACHE: dict[str, VAE] = {}


def load_vae(name: str = "mel_2bar") -> VAE:
    """The shipped model ``name`` (or a .safetensors path), loaded once per process."""
    if name not in _CACHE:
        from .weights import load_model

        model, meta, attrs = load_model(name)
        _CACHE[name] = VAE(model, meta, attrs)
    return _CACHE[name]


def melody_to_events(notes, step_s: float, n_steps: int) -> np.ndarray:
    """[(t_on, t_off, pitch)] in seconds from the window start -> events (top voice, octave-folded)."""
    from .data import fold_pitches, notes_to_events

    folded = fold_pitches([p for _, _, p in notes])
    q = [(int(round(a / step_s)), int(round(b / step_s)), int(p)) for (a, b, _), p in zip(notes, folded)]
    ev = notes_to_events(q, n_steps)
    return ev.astype(np.int64)
