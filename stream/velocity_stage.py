"""The velocity stage: decides the outgoing velocity of each note-on.

It asks the model worker for a prediction and combines it with the player's own velocity by mode:
``replace`` takes the model's, ``blend`` mixes by ``strength`` (so the player's accents survive),
``flat-only`` colorizes only while the incoming velocities are constant (a keyboard without
velocity sensing, a step sequencer). A prediction that misses the deadline is replaced by the
fallback velocity by the engine; the stage itself never waits.

Each session (source) has its own stage -- its mode, strength and bypass are that performer's
controls -- over the one worker all sessions share (it batches their notes together).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from cadenza.config.settings import Settings, VelocitySettings
from cadenza.models.runtime import SessionKey, pick_device
from cadenza.models.velocity.worker import VelocityWorker

MODES = ("replace", "blend", "flat-only")


class VelocityStage:
    def __init__(self, settings: VelocitySettings, worker: VelocityWorker | None) -> None:
        self.worker = worker
        self.mode = settings.mode
        self.strength = settings.strength
        self.fallback = settings.fallback_velocity
        self.deadline_s = settings.deadline_ms / 1000.0
        self.flat_window = settings.flat_window
        self.bypass = False
        self._recent: dict[SessionKey, deque[int]] = {}

    @property
    def active(self) -> bool:
        return self.worker is not None and not self.bypass

    def is_flat(self, session: SessionKey, velocity: int) -> bool:
        recent = self._recent.get(session)
        if recent is None:
            recent = self._recent[session] = deque(maxlen=self.flat_window)
        recent.append(velocity)
        return len(recent) >= 2 and min(recent) == max(recent)

    def request(self, session: SessionKey, t: float, pitch: int, velocity: int) -> asyncio.Future[float] | _Down | None:
        """Ask the worker for this note's velocity; None when the player's velocity stands as is.

        The worker always sees the note (its recurrent state must follow the music), even when
        the answer will not be used.
        """
        if self.worker is None:
            return None
        fut = self.worker.note_on(session, t, pitch)  # None while the model is down
        if fut is None:
            fut = _DOWN
        flat = self.is_flat(session, velocity)
        if self.bypass or (self.mode == "flat-only" and not flat):
            return None
        return fut

    def combine(self, player: int, model: float | None) -> int:
        """The outgoing velocity from the player's and the model's (None: missed or down)."""
        v = float(self.fallback) if model is None else model
        if self.mode == "blend":
            v = (1.0 - self.strength) * player + self.strength * v
        return int(min(127, max(1, round(v))))

    def flush(self) -> None:
        """Let an inline worker answer what was asked since the last call (no-op for a thread)."""
        if self.worker is not None and self.worker.inline:
            self.worker.flush()

    def note_off(self, session: SessionKey, t: float, pitch: int) -> None:
        if self.worker is not None and self.worker.alive:
            self.worker.note_off(session, t, pitch)

    def pedal(self, session: SessionKey, t: float, value: int) -> None:
        if self.worker is not None and self.worker.alive:
            self.worker.pedal(session, t, value)

    def forget(self, session: SessionKey) -> None:
        """Drop everything kept for a session that has ended."""
        self._recent.pop(session, None)
        if self.worker is not None and self.worker.alive:
            self.worker.forget(session)

    def forget_all(self, source: int, channels: Iterable[int] = ()) -> None:
        """Drop what is kept for every channel of ``source`` this stage has seen, and ``channels``."""
        for key in {k for k in self._recent if k[0] == source} | {(source, ch) for ch in channels}:
            self.forget(key)


class _Down:
    """Marker: the worker is down, use the fallback at once (counted as a miss)."""


_DOWN = _Down()


def is_down(x: object) -> bool:
    return x is _DOWN


def build_velocity_worker(settings: Settings) -> VelocityWorker:
    """The causal velocity model in its worker (loaded and warmed up by ``start``)."""
    from cadenza.models.velocity.causal import load_causal_step
    from cadenza.models.velocity.features import LiveVelocityFeatures

    device = pick_device(settings.velocity.device)
    return VelocityWorker(
        load_model=lambda: load_causal_step(settings.velocity.weights, device=device),
        make_features=LiveVelocityFeatures,
        max_batch=settings.velocity.max_batch,
        inline=settings.velocity.worker == "inline" or (settings.velocity.worker == "auto" and device == "cpu"),
    )
