"""The MusicVAE model stage for live ``vary`` / ``morph``: one handler of the model runtime.

A job is one loop the performer just played (sixteenth-grid events, see ``data.py``) and what to
do with it; the answer is the events to play over the next loop. The handler keeps, per session,
the latent code it played last and the morph path it is on, so the loop's state lives with the
model and a crash (the runtime restarts the handler with ``reset()``) starts every path afresh.

One model serves every session; the loops of a burst are encoded and decoded one after another
(a loop is one short encode + decode, and sessions' loop lines seldom fall in the same burst).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cadenza.models.runtime import Post, SessionKey
from cadenza.models.vae.live import VAE

VaryMode = Literal["vary", "morph"]

# Two encodings of loops closer than this (Euclidean, in the prior's units) are the same loop
# played again; a larger jump is a new loop and starts a morph from what is playing.
SAME_LOOP = 1.0


@dataclass
class VaryJob:
    """Vary the loop ``events`` of ``session``; the answer (events, z played) is set on ``future``."""

    session: SessionKey
    events: np.ndarray  # (T,) int64
    mode: VaryMode
    amount: float  # vary: std of the noise added to z
    repeats: int  # morph: K, the repetitions a path from the old loop to the new one takes
    attributes: dict[str, float]  # attribute vector name -> amount, added to z
    temperature: float  # 0 = greedy decoding
    seed: int
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class Forget:
    """A session (source) has ended: drop the paths of all its channels."""

    source: int


VaeJob = VaryJob | Forget


@dataclass
class _Path:
    origin: np.ndarray  # what was playing when this loop came in
    target: np.ndarray  # this loop's code
    k: int  # repetitions along the path so far
    played: np.ndarray  # the z decoded last


class VaeHandler:
    """Encode, move in the latent space, decode: on the runtime's thread (or inline)."""

    def __init__(self, load: Callable[[], VAE]) -> None:
        self._load = load
        self.vae: VAE | None = None
        self._paths: dict[SessionKey, _Path] = {}

    def load(self) -> None:
        self.vae = self._load()
        silence = np.zeros(self.vae.steps, np.int64)
        silence[0] = 2 + 24  # one note, so the warm-up runs the same kernels a loop does
        self.vae.decode(self.vae.encode_steps(silence), 0.0, seed=0)

    def reset(self) -> None:
        self._paths.clear()

    def run(self, jobs: list[VaeJob], post: Post) -> int:
        assert self.vae is not None
        n = 0
        for job in jobs:
            if isinstance(job, Forget):
                for key in [k for k in self._paths if k[0] == job.source]:
                    del self._paths[key]
                continue
            if job.future.done():  # cancelled meanwhile (panic, mode switch)
                continue
            z = self.vae.encode_steps(job.events)
            z_play = self._move(job, z)
            for name, amount in job.attributes.items():
                if amount and name in self.vae.attrs:
                    z_play = self.vae.apply_attribute(z_play, name, amount)
            out = self.vae.decode(z_play, job.temperature, seed=job.seed)
            post(_settle, job.future, (out, z_play))
            n += 1
        return n

    def _move(self, job: VaryJob, z: np.ndarray) -> np.ndarray:
        """The code to decode for this repetition of the loop."""
        assert self.vae is not None
        path = self._paths.get(job.session)
        if path is None or np.linalg.norm(z - path.target) > SAME_LOOP:
            path = self._paths[job.session] = _Path(origin=z if path is None else path.played, target=z, k=0, played=z)
        path.k += 1
        if job.mode == "morph":
            z_play = self.vae.morph(path.origin, path.target, min(path.k, job.repeats), job.repeats)
        else:
            rng = np.random.default_rng(job.seed)
            z_play = (z + job.amount * rng.standard_normal(z.shape[0])).astype(np.float32)
        path.played = z_play
        return z_play

    def fallback(self, jobs: list[VaeJob]) -> int:
        """No model: this loop gets no variation (the performer's own loop still plays); a
        forgotten session's paths go with the restart anyway."""
        n = 0
        for job in jobs:
            if isinstance(job, VaryJob) and not job.future.done():
                job.future.cancel()
                n += 1
        return n


def _settle(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)
