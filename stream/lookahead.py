"""Lookahead mode, for DAW routing: output delayed by exactly S seconds, the model sees the future.

Every event leaves exactly ``S`` after it arrived (DAWs compensate a declared, fixed delay). A
note-on's velocity comes from the full-context model, which is run for that note at
``t + S - margin`` over the session's recent notes: it sees everything played up to then, so its
effective lookahead is ``S - margin`` (20 ms by default), the time the model has to answer before
the note is due. An answer that is not back in time is replaced by the fallback and counted, as in
the causal path. The model runs in the model runtime: a request still queued when its note is due
is not run, and while a crashed model waits for its restart, due notes get the fallback.

Windows are kept per (source, channel); every delayed event carries its source, so it leaves as
the session it came from. Each request is one window (the notes around one note, of one
session); the requests of all sessions drained in one burst are run one after another.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cadenza.config.settings import Settings
from cadenza.errors import ConfigError
from cadenza.models.runtime import (
    DEFAULT_BACKOFF,
    Backoff,
    ModelStage,
    Post,
    SessionKey,
    pick_device,
)
from cadenza.models.velocity.batching import Featurizer

if TYPE_CHECKING:
    from cadenza.models.velocity.context import ContextVelocityModel

WINDOW = 256  # notes of context the model gets


@dataclass(frozen=True)
class Delayed:
    """Scheduler tag of a delayed event: the source it goes out as, and for a note-on the id of
    the note whose velocity is filled in when it is due."""

    source: int
    note: int | None = None


class _Session:
    def __init__(self, make_features: Callable[[], Featurizer]) -> None:
        self.features = make_features()
        self.ids: list[int] = []
        self.x: list[np.ndarray] = []
        self.onset: list[float] = []
        self.offset: list[float] = []
        self.pitch: list[int] = []

    def trim(self) -> None:
        extra = len(self.ids) - 4 * WINDOW
        if extra > 0:
            for name in ("ids", "x", "onset", "offset", "pitch"):
                del getattr(self, name)[:extra]


# (note id, features (N, F), onsets (N,), offsets (N,), pitches (N,), index of the note to answer)
Job = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


class LoadContext(Protocol):
    def __call__(self) -> ContextVelocityModel: ...


class LookaheadStage:
    """Per-session note windows on the loop; the full-context model in the runtime."""

    def __init__(
        self,
        *,
        seconds: float,
        load_model: LoadContext,
        make_features: Callable[[], Featurizer],
        margin: float = 0.02,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.seconds = seconds
        self.margin = min(margin, seconds / 2)
        self._load_model = load_model
        self._make_features = make_features
        self._sessions: dict[SessionKey, _Session] = {}
        self._ids = itertools.count()
        self._velocity: dict[int, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.model: ContextVelocityModel | None = None
        self.stage: ModelStage[Job] = ModelStage(self, name="lookahead", backoff=backoff)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the model (blocking) and start serving."""
        self._loop = loop
        self.stage.start(loop)

    def stop(self) -> None:
        self.stage.stop()

    def kill(self) -> None:
        """Fault drill: the model raises where it runs; due notes fall back until it restarts."""
        self.stage.kill()

    # ---- the runtime's handler (load/reset/run/fallback) -----------------------------------

    def load(self) -> None:
        """Load, and answer one scratch window so the first real note does not pay for
        first-call allocations."""
        from cadenza.models.velocity.context import predict_window

        self.model = self._load_model()
        feats = self._make_features()
        n = 16
        x = np.stack([feats.note_on(0.1 * i, 60 + i % 12) for i in range(n)])
        onset = 0.1 * np.arange(n)
        predict_window(self.model, x, onset, onset + 0.05, np.full(n, 60.0, np.float32), self.seconds - self.margin, np.array([n // 2]))

    def reset(self) -> None:
        """The windows live on the loop and stay valid: nothing of the model to forget."""

    def run(self, jobs: list[Job], post: Post) -> int:
        from cadenza.models.velocity.context import predict_window

        assert self.model is not None
        for nid, x, onset, offset, pitch, target in jobs:
            v = predict_window(self.model, x, onset, offset, pitch, self.seconds - self.margin, np.array([target]))
            post(self._store, nid, float(v[0]))
        return len(jobs)

    def fallback(self, jobs: list[Job]) -> int:
        """Nothing to send: a due note without an answer gets the fallback velocity (and is
        counted as a deadline miss) when it leaves."""
        return len(jobs)

    # ---- called on the loop ---------------------------------------------------------------

    def note_on(self, session: SessionKey, t: float, pitch: int) -> Delayed:
        assert self._loop is not None
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Session(self._make_features)
        nid = next(self._ids)
        s.ids.append(nid)
        s.x.append(s.features.note_on(t, pitch))
        s.onset.append(t)
        s.offset.append(np.nan)
        s.pitch.append(pitch)
        s.trim()
        self._loop.call_at(t + self.seconds - self.margin, self._request, session, nid, t + self.seconds)
        return Delayed(session[0], nid)

    def note_off(self, session: SessionKey, t: float, pitch: int) -> None:
        s = self._sessions.get(session)
        if s is None:
            return
        s.features.note_off(t, pitch)
        for i in range(len(s.pitch) - 1, -1, -1):  # the most recent still-held note of this key
            if s.pitch[i] == pitch and np.isnan(s.offset[i]):
                s.offset[i] = t
                break

    def pedal(self, session: SessionKey, t: float, value: int) -> None:
        s = self._sessions.get(session)
        if s is not None:
            s.features.pedal(t, value)

    def _request(self, session: SessionKey, nid: int, due: float) -> None:
        s = self._sessions.get(session)
        if s is None:
            return  # the session has ended
        try:
            k = s.ids.index(nid)
        except ValueError:
            return
        lo = max(0, k - WINDOW // 2)
        job = (nid, np.stack(s.x[lo:]), np.asarray(s.onset[lo:]), np.asarray(s.offset[lo:]), np.asarray(s.pitch[lo:], np.float32), k - lo)
        self.stage.submit(job, deadline=due)  # not run at all once the note has left

    def resolve(self, tag: Delayed) -> float | None:
        """The model's velocity for a due note, or None when it is not back in time."""
        return self._velocity.pop(tag.note, None)

    def forget_source(self, source: int) -> None:
        """Drop the windows of every channel of a source that has ended."""
        for key in [k for k in self._sessions if k[0] == source]:
            del self._sessions[key]

    def _store(self, nid: int, v: float) -> None:
        self._velocity[nid] = v


def build_lookahead(settings: Settings) -> LookaheadStage:
    from cadenza.models.velocity.context import load_context
    from cadenza.models.velocity.features import LiveVelocityFeatures

    seconds = settings.velocity.lookahead_s
    if seconds <= 0:
        raise ConfigError("--mode lookahead needs a lookahead > 0 s (--lookahead SECONDS or velocity.lookahead_s)")
    device = pick_device(settings.velocity.device)
    return LookaheadStage(
        seconds=seconds,
        load_model=lambda: load_context(settings.velocity.context_weights, device=device),
        make_features=LiveVelocityFeatures,
    )
