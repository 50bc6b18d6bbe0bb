"""The velocity model worker: a thread that owns the torch state, off the event loop.

Requests from every session (one session = one input channel of one source) go through a single
queue, so each session's events are applied in order. The worker drains whatever is queued,
builds one batch per "round" (a session appears at most once in a round, because its recurrent
state must advance note by note), runs the model once per round, and resolves each request's
asyncio future on the loop. It never waits for a batch to fill: latency first.

A crash in the worker thread fails nothing on the loop: pending and later requests are answered by
the engine's fallback until the engine restarts the worker (``restart()``), with fresh session state.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

_NOTE_ON, _NOTE_OFF, _PEDAL, _RESET, _CRASH, _STOP = range(6)


class WorkerCrashed(RuntimeError):
    """Raised inside the worker thread by ``kill()``: the way tests and operators simulate a crash."""


@dataclass
class WorkerStats:
    requests: int = 0
    batches: int = 0
    max_batch: int = 0
    crashes: int = 0
    infer_s: list = field(default_factory=list)  # per-round model time, bounded below

    def record_round(self, n: int, dt: float) -> None:
        self.batches += 1
        self.max_batch = max(self.max_batch, n)
        if len(self.infer_s) < 100_000:
            self.infer_s.append(dt)


def pick_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class VelocityWorker:
    """Runs ``model.step`` for note-on requests; keeps per-session features and recurrent state.

    ``load_model()`` returns an object with ``initial_state(batch)`` and
    ``step(x (B, F), state) -> (velocity (B,), state)``; ``make_features()`` returns a fresh
    per-session featurizer with ``note_on(t, pitch) -> (F,)``, ``note_off(t, pitch)`` and
    ``pedal(t, value)``.
    """

    def __init__(self, *, load_model: Callable[[], Any], make_features: Callable[[], Any], max_batch: int = 64, threads: int = 1) -> None:
        self._load_model = load_model
        self._make_features = make_features
        self.max_batch = max_batch
        self.threads = threads
        self.model = None
        self._numpy = False
        self.stats = WorkerStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alive = False
        self._features: dict[Any, Any] = {}
        self._states: dict[Any, Any] = {}

    # ---- lifecycle (called from the loop thread) -------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load and warm up the model (blocking: call it before serving, or via to_thread)."""
        import torch

        torch.set_num_threads(self.threads)
        self._loop = loop
        if self.model is None:
            self.model = self._load_model()
            self._numpy = isinstance(self.model.initial_state(1), np.ndarray)  # the CPU step
            self._warm_up()
        self._features.clear()
        self._states.clear()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="velocity-worker", daemon=True)
        self._alive = True
        self._thread.start()

    def _warm_up(self) -> None:
        feats = self._make_features()
        state = self.model.initial_state(1)
        for i in range(32):
            _, state = self.model.step(self._as_input([feats.note_on(i * 0.1, 60 + i % 12)]), state)

    @property
    def alive(self) -> bool:
        # A flag, not Thread.is_alive(): this is read for every note, and the thread clears it
        # on its way out whatever ends it.
        return self._alive

    def restart(self) -> None:
        assert self._loop is not None
        self.stop()
        self.start(self._loop)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put((_STOP, None, 0.0, 0, None))
            self._thread.join(2.0)
        self._alive = False
        self._thread = None

    def kill(self) -> None:
        """Make the worker thread die as if the model had raised (for tests and fault drills)."""
        self._queue.put((_CRASH, None, 0.0, 0, None))

    # ---- requests (called from the loop thread, never block) --------------------------------

    def note_on(self, session: Any, t: float, pitch: int) -> asyncio.Future:
        fut = self._loop.create_future()
        self._queue.put((_NOTE_ON, session, t, pitch, fut))
        return fut

    def note_off(self, session: Any, t: float, pitch: int) -> None:
        self._queue.put((_NOTE_OFF, session, t, pitch, None))

    def pedal(self, session: Any, t: float, value: int) -> None:
        self._queue.put((_PEDAL, session, t, value, None))

    def reset(self, session: Any) -> None:
        self._queue.put((_RESET, session, 0.0, 0, None))

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ---- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._thread is threading.current_thread():  # not a replacement started meanwhile
                self._alive = False

    def _serve(self) -> None:
        try:
            while True:
                items = [self._queue.get()]
                while len(items) < 4 * self.max_batch:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not self._process(items):
                    return
        except Exception as exc:  # the model or featurizer failed: report, die, get restarted
            self.stats.crashes += 1
            log.error("velocity worker crashed: %s", exc)
            self._alive = False

    def _process(self, items: list) -> bool:
        rounds: list[dict] = [{}]
        for kind, session, t, arg, fut in items:
            if kind == _STOP:
                self._alive = False
                return False
            if kind == _CRASH:
                raise WorkerCrashed("killed on request")
            feats = self._features.get(session)
            if feats is None:
                feats = self._features[session] = self._make_features()
            if kind == _NOTE_ON:
                x = feats.note_on(t, arg)
                rnd = rounds[-1]
                if session in rnd or len(rnd) >= self.max_batch:
                    rnd = {}
                    rounds.append(rnd)
                rnd[session] = (x, fut)
            elif kind == _NOTE_OFF:
                feats.note_off(t, arg)
            elif kind == _PEDAL:
                feats.pedal(t, arg)
            elif kind == _RESET:
                self._features.pop(session, None)
                self._states.pop(session, None)
        for rnd in rounds:
            if rnd:
                self._infer(rnd)
        return True

    def _as_input(self, rows: list[np.ndarray]):
        x = np.stack(rows).astype(np.float32, copy=False)
        if self._numpy:
            return x
        import torch

        return torch.from_numpy(x).to(self._device())

    def _device(self):
        dev = getattr(self.model, "feat_mean", None)
        return "cpu" if dev is None else dev.device

    def _infer(self, rnd: dict) -> None:
        t0 = time.perf_counter()
        model = self.model
        sessions = list(rnd)
        x = self._as_input([rnd[s][0] for s in sessions])
        dim = getattr(model, "state_batch_dim", 0)
        states = [self._states.get(s) for s in sessions]
        init = None
        for i, st in enumerate(states):
            if st is None:
                if init is None:
                    init = model.initial_state(1)
                states[i] = init
        if len(states) == 1:
            state = states[0]
        elif isinstance(states[0], np.ndarray):
            state = np.concatenate(states, axis=dim)
        else:
            import torch

            state = torch.cat(states, dim=dim)
        vel, new_state = model.step(x, state)
        if len(sessions) == 1:
            self._states[sessions[0]] = new_state
        else:
            for i, s in enumerate(sessions):
                self._states[s] = new_state[(slice(None),) * dim + (slice(i, i + 1),)]
        values = vel.tolist() if isinstance(vel, np.ndarray) else vel.detach().cpu().numpy().tolist()
        self.stats.requests += len(sessions)
        self.stats.record_round(len(sessions), time.perf_counter() - t0)
        loop = self._loop
        for s, v in zip(sessions, values):
            loop.call_soon_threadsafe(_resolve, rnd[s][1], v)


def _resolve(fut: asyncio.Future, value: float) -> None:
    if not fut.done():
        fut.set_result(value)
