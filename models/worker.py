"""The velocity model worker: a thread that owns the torch state, off the event loop.

Requests from every session (one session = one input channel of one source) go through a single
queue, so each session's events are applied in order. The worker drains whatever is queued,
builds one batch per "round" (a session appears at most once in a round, because its recurrent
state must advance note by note), runs the model once per round, and resolves each request's
asyncio future on the loop. It never waits for a batch to fill: latency first.

A crash in the worker thread fails nothing on the loop: pending and later requests are answered by
the engine's fallback until the engine restarts the worker (``restart()``), with fresh session state.

Two ways to run (``velocity.worker`` in config):

* ``thread``: the above. It is what a GPU needs (the model call releases the GIL while CUDA
  works, and sessions are batched), and it keeps a slow model from holding up the loop.
* ``inline``: the same state and the same model calls, run on the loop thread by the engine's
  pump (``flush()``) right after it has read a burst of input. On a CPU the numpy step holds the
  GIL for nearly all of its ~0.1 ms, so a thread buys no parallelism there — only two thread
  handoffs per note (six A/B runs of ``bench latency`` on the 2-core CI machine: added latency
  p50 1.3–1.9 ms inline vs 1.4–1.9 ms threaded, and fewer deadline misses inline). A step
  that runs past the deadline is still counted as a miss. ``auto`` picks inline on a CPU.
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
    prepared: int = 0  # notes whose hidden side was computed after the session's previous note
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
    ``pedal(t, value)``. A numpy model (the CPU step) also offers ``inputs``/``recur``/``head``,
    which let a burst share its input-side and head calls. With ``inline=True`` nothing runs
    until the owner calls :meth:`flush` on the loop thread.
    """

    def __init__(self, *, load_model: Callable[[], Any], make_features: Callable[[], Any], max_batch: int = 64, threads: int = 1,
                 inline: bool = False) -> None:
        self.inline = inline
        self._pending: list = []  # inline: requests since the last flush()
        self._load_model = load_model
        self._make_features = make_features
        self.max_batch = max_batch
        self.threads = threads
        self.model = None
        self._numpy = False
        self._blas_limit = None
        self.stats = WorkerStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alive = False
        self._features: dict[Any, Any] = {}
        self._states: dict[Any, Any] = {}
        # numpy model: each session's next hidden-side product, computed once its note has gone
        # out (state it belongs to, product); see _prepare_next
        self._next: dict[Any, tuple] = {}
        self._to_prepare: set = set()
        self._scratch: tuple | None = None  # keep_warm's featurizer and state
        self._scratch_n = 0

    # ---- lifecycle (called from the loop thread) -------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load and warm up the model (blocking: call it before serving, or via to_thread)."""
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(self.threads)
        if self._blas_limit is None:
            # numpy's OpenBLAS splits even a (4 x 256) @ (256 x 768) product over its threads;
            # waking a pool thread on a busy core cost chords up to 8 ms here. One thread, kept
            # for the life of the process (the limit is process-wide).
            self._blas_limit = threadpool_limits(self.threads, user_api="blas")
        self._loop = loop
        if self.model is None:
            self.model = self._load_model()
            self._numpy = isinstance(self.model.initial_state(1), np.ndarray)  # the CPU step
            self._warm_up()
        self._features.clear()
        self._states.clear()
        self._next.clear()
        self._to_prepare.clear()
        self._pending = []
        self._alive = True
        if self.inline:
            return
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="velocity-worker", daemon=True)
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
        self._fail_pending()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put((_STOP, None, 0.0, 0, None))
            self._thread.join(2.0)
        self._alive = False
        self._thread = None

    def kill(self) -> None:
        """Make the worker die as if the model had raised (for tests and fault drills)."""
        self._submit((_CRASH, None, 0.0, 0, None))
        if self.inline:
            self.flush()

    # ---- requests (called from the loop thread, never block) --------------------------------

    def _submit(self, item: tuple) -> None:
        if self.inline:
            self._pending.append(item)
        else:
            self._queue.put(item)

    def note_on(self, session: Any, t: float, pitch: int) -> asyncio.Future:
        fut = self._loop.create_future()
        self._submit((_NOTE_ON, session, t, pitch, fut))
        return fut

    def note_off(self, session: Any, t: float, pitch: int) -> None:
        self._submit((_NOTE_OFF, session, t, pitch, None))

    def pedal(self, session: Any, t: float, value: int) -> None:
        self._submit((_PEDAL, session, t, value, None))

    def reset(self, session: Any) -> None:
        self._submit((_RESET, session, 0.0, 0, None))

    def queue_depth(self) -> int:
        return len(self._pending) if self.inline else self._queue.qsize()

    def flush(self) -> None:
        """Inline: answer everything submitted since the last flush, now (the pump calls this)."""
        if not self._pending:
            return
        items, self._pending = self._pending, []
        if not self._alive:
            _cancel(items)
            return
        try:
            self._process(items)
        except Exception as exc:
            self._crashed(exc)
            _cancel(items)

    def keep_warm(self) -> None:
        """Inline CPU worker, while idle: one scratch note through a private featurizer and
        state, answer discarded. On a machine where other processes (the synth, the DAW, JACK)
        run between notes, the ~2 MB of weights and the feature code fall out of the caches, and
        the next note costs ~0.6 ms instead of ~0.15; calling this every millisecond or so keeps
        them in. Every 4th call is a chord, whose path (4-row products, note-by-note recurrence)
        is otherwise cold when a chord comes. No session, statistic or future is touched."""
        if not (self.inline and self._numpy and self._alive):
            return
        if self._scratch is None or self._scratch_n >= 512:
            self._scratch = (self._make_features(), self.model.initial_state(1))
            self._scratch_n = 0
        feats, state = self._scratch
        n = self._scratch_n
        t, pitch = 0.125 * n, 48 + (n * 7) % 36
        # every 4th tick a 4-note chord: its note-by-note path and 4-row products stay warm too
        g = self.model.inputs(np.stack([feats.note_on(t, pitch + 4 * k) for k in range(1 if n % 4 else 4)]))
        h, state = self._in_order(g, state, None)
        self.model.head(h, g)
        self._scratch = (feats, state)
        self._scratch_n += 1

    def _fail_pending(self) -> None:
        items, self._pending = self._pending, []
        _cancel(items)

    def _crashed(self, exc: Exception) -> None:
        self.stats.crashes += 1
        log.error("velocity worker crashed: %s", exc)
        self._alive = False

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
            self._crashed(exc)

    def _process(self, items: list) -> bool:
        """Apply a drained burst in order and answer its note-ons."""
        notes: list[tuple[Any, np.ndarray, asyncio.Future]] = []
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
                notes.append((session, feats.note_on(t, arg), fut))
            elif kind == _NOTE_OFF:
                feats.note_off(t, arg)
            elif kind == _PEDAL:
                feats.pedal(t, arg)
            elif kind == _RESET:
                self._infer_burst(notes)  # what came before the reset, with the state it had
                notes = []
                self._features.pop(session, None)
                self._states.pop(session, None)
                self._next.pop(session, None)
        self._infer_burst(notes)
        return True

    def _rounds(self, sessions: list) -> list[list[int]]:
        """Note indices grouped into rounds: a session at most once per round and after the
        round of its previous note (its state advances note by note), at most max_batch each."""
        rounds: list[list[int]] = []
        after: dict[Any, int] = {}
        for i, s in enumerate(sessions):
            r = after.get(s, -1) + 1
            while r < len(rounds) and len(rounds[r]) >= self.max_batch:
                r += 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
            after[s] = r
        return rounds

    def _state(self, session: Any):
        st = self._states.get(session)
        return self.model.initial_state(1) if st is None else st

    def _infer_burst(self, notes: list) -> None:
        if not notes:
            return
        t0 = time.perf_counter()
        sessions = [s for s, _, _ in notes]
        if self._numpy:
            values = self._infer_numpy(notes, sessions)
        else:
            values = [0.0] * len(notes)
            for rnd in self._rounds(sessions):
                for i, v in zip(rnd, self._infer_round([notes[i] for i in rnd])):
                    values[i] = v
        self.stats.requests += len(notes)
        self.stats.record_round(len(notes), time.perf_counter() - t0)
        self._answer([fut for _, _, fut in notes], values)

    def _infer_numpy(self, notes: list, sessions: list) -> list[float]:
        """Note side once for the whole burst; the recurrence once per round, batched across the
        round's sessions; the head once. A session's hidden side is usually ready from after its
        previous note (:meth:`_prepare_next`), which leaves the gates and the head between a note
        and its answer."""
        model = self.model
        s = sessions[0]
        if len(notes) == 1 or sessions.count(s) == len(sessions):
            # one player: a note, or a chord on one channel — without the rounds' bookkeeping
            g = model.inputs(notes[0][1][None] if len(notes) == 1 else np.stack([x for _, x, _ in notes]))
            state = self._state(s)
            h, self._states[s] = self._in_order(g, state, self._ready_next(s, state))
            values = model.head(h, g).tolist()
        else:
            g = model.inputs(np.stack([x for _, x, _ in notes]))
            h = np.empty((len(notes), model.hidden), np.float32)
            for rnd in self._rounds(sessions):
                ss = [sessions[i] for i in rnd]
                states = [self._state(s) for s in ss]
                ready = [self._ready_next(s, st) for s, st in zip(ss, states)]
                if len(ss) == 1:
                    new = model.recur(g[rnd], states[0], ready[0])
                else:
                    missing = [j for j, r in enumerate(ready) if r is None]
                    if missing:  # only those not prepared after their session's last note
                        fresh = model.hidden_side(np.concatenate([states[j] for j in missing]))
                        for k, j in enumerate(missing):
                            ready[j] = fresh[k : k + 1]
                    new = model.recur(g[rnd], np.concatenate(states), np.concatenate(ready))
                h[rnd] = new
                for j, s in enumerate(ss):
                    self._states[s] = new[j : j + 1]
            values = model.head(h, g).tolist()
        if self.inline:
            # after the pump has sent these notes (it does so before it yields to the loop)
            if not self._to_prepare:
                self._loop.call_soon(self._prepare_next)
            self._to_prepare.update(sessions)
        return values

    def _in_order(self, g: np.ndarray, state: np.ndarray, gh: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One session's notes (the rows of ``g``, from ``inputs``), note by note: each needs the
        state the last one left. ``gh`` is the first note's hidden side if already known.
        Returns the states after each note (N, H) and the last one (1, H)."""
        if len(g) == 1:
            h = self.model.recur(g, state, gh)
            return h, h
        rows = []
        for i in range(len(g)):
            state = self.model.recur(g[i : i + 1], state, gh)
            gh = None
            rows.append(state)
        return np.concatenate(rows), state

    def _ready_next(self, session: Any, state: np.ndarray) -> np.ndarray | None:
        """The session's precomputed hidden side, if it belongs to this very state."""
        ready = self._next.pop(session, None)
        if ready is None or ready[0] is not state:
            return None
        self.stats.prepared += 1
        return ready[1]

    def _prepare_next(self) -> None:
        """Inline numpy worker, on the loop after the notes went out: each session's next
        hidden-side product, so that its next note does not wait for it."""
        sessions, self._to_prepare = self._to_prepare, set()
        if not self._alive:
            return
        ready = [(s, st) for s in sessions if (st := self._states.get(s)) is not None]
        if ready:  # one product for all of them
            gh = self.model.hidden_side(np.concatenate([st for _, st in ready]))
            for i, (s, state) in enumerate(ready):
                self._next[s] = (state, gh[i : i + 1])

    def _answer(self, futures: list, values: list) -> None:
        if self.inline:
            for fut, v in zip(futures, values):
                _resolve(fut, v)
        else:
            call = self._loop.call_soon_threadsafe
            for fut, v in zip(futures, values):
                call(_resolve, fut, v)

    def _as_input(self, rows: list[np.ndarray]):
        x = np.stack(rows).astype(np.float32, copy=False)
        if self._numpy:
            return x
        import torch

        return torch.from_numpy(x).to(self.model.feat_mean.device)

    def _infer_round(self, notes: list) -> list[float]:
        """The torch model (GPU): one batched step for a round of distinct sessions."""
        import torch

        model = self.model
        dim = getattr(model, "state_batch_dim", 0)
        sessions = [s for s, _, _ in notes]
        states = [self._state(s) for s in sessions]
        state = states[0] if len(states) == 1 else torch.cat(states, dim=dim)
        vel, new_state = model.step(self._as_input([x for _, x, _ in notes]), state)
        for i, s in enumerate(sessions):
            self._states[s] = new_state.narrow(dim, i, 1)
        return vel.detach().cpu().numpy().tolist()


def _cancel(items: list) -> None:
    """Cancel the unanswered note-on futures among queued requests; the engine then emits those
    notes at once with the fallback velocity (and counts the misses)."""
    for item in items:
        if item[4] is not None and not item[4].done():
            item[4].cancel()


def _resolve(fut: asyncio.Future, value: float) -> None:
    if not fut.done():
        fut.set_result(value)
