"""Lookahead mode, for DAW routing: output delayed by exactly S seconds, the model sees the future.

Every event leaves exactly ``S`` after it arrived (DAWs compensate a declared, fixed delay). A
note-on's velocity comes from the full-context model, which is run for that note at
``t + S - margin`` over the session's recent notes: it sees everything played up to then, so its
effective lookahead is ``S - margin`` (20 ms by default), the time the model has to answer before
the note is due. An answer that is not back in time is replaced by the fallback and counted, as in
the causal path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cadenza.config.settings import Settings
from cadenza.errors import ConfigError
from cadenza.models.worker import pick_device

log = logging.getLogger(__name__)

WINDOW = 256  # notes of context the model gets


@dataclass(frozen=True)
class LookaheadNote:
    """Scheduler tag of a delayed note-on whose velocity is filled in when it is due."""

    id: int


class _Session:
    def __init__(self, make_features: Callable[[], Any]) -> None:
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


class LookaheadStage:
    def __init__(self, *, seconds: float, load_model: Callable[[], Any], make_features: Callable[[], Any], margin: float = 0.02) -> None:
        self.seconds = seconds
        self.margin = min(margin, seconds / 2)
        self._load_model = load_model
        self._make_features = make_features
        self._sessions: dict[Any, _Session] = {}
        self._ids = itertools.count()
        self._velocity: dict[int, float] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.model = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the model (blocking) and start its thread."""
        self._loop = loop
        self.model = self._load_model()
        self._thread = threading.Thread(target=self._run, name="lookahead-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(2.0)

    # ---- called on the loop ---------------------------------------------------------------

    def note_on(self, session: Any, t: float, pitch: int) -> LookaheadNote:
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
        self._loop.call_at(t + self.seconds - self.margin, self._request, session, nid)
        return LookaheadNote(nid)

    def note_off(self, session: Any, t: float, pitch: int) -> None:
        s = self._sessions.get(session)
        if s is None:
            return
        s.features.note_off(t, pitch)
        for i in range(len(s.pitch) - 1, -1, -1):  # the most recent still-held note of this key
            if s.pitch[i] == pitch and np.isnan(s.offset[i]):
                s.offset[i] = t
                break

    def pedal(self, session: Any, t: float, value: int) -> None:
        s = self._sessions.get(session)
        if s is not None:
            s.features.pedal(t, value)

    def _request(self, session: Any, nid: int) -> None:
        s = self._sessions[session]
        try:
            k = s.ids.index(nid)
        except ValueError:
            return
        lo = max(0, k - WINDOW // 2)
        job = (nid, np.stack(s.x[lo:]), np.asarray(s.onset[lo:]), np.asarray(s.offset[lo:]), np.asarray(s.pitch[lo:], np.float32), k - lo)
        self._queue.put(job)

    def resolve(self, tag: LookaheadNote) -> float | None:
        """The model's velocity for a due note, or None when it is not back in time."""
        return self._velocity.pop(tag.id, None)

    def _store(self, nid: int, v: float) -> None:
        self._velocity[nid] = v

    # ---- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        from cadenza.models.velocity.context import predict_window

        while True:
            job = self._queue.get()
            if job is None:
                return
            nid, x, onset, offset, pitch, target = job
            try:
                v = predict_window(self.model, x, onset, offset, pitch, self.seconds - self.margin, np.array([target]))
                self._loop.call_soon_threadsafe(self._store, nid, float(v[0]))
            except Exception as exc:  # a failed prediction falls back; the stream goes on
                log.error("lookahead model: %s", exc)


def build_lookahead(settings: Settings) -> LookaheadStage:
    from cadenza.models.velocity.context import load_context
    from cadenza.models.velocity.features import LiveVelocityFeatures

    seconds = settings.velocity.lookahead_s
    if seconds <= 0:
        raise ConfigError("--mode lookahead needs a lookahead > 0 s (--lookahead SECONDS or velocity.lookahead_s)")
    device = pick_device(settings.velocity.device)
    return LookaheadStage(seconds=seconds, load_model=lambda: load_context(settings.velocity.context_weights, device=device), make_features=LiveVelocityFeatures)
