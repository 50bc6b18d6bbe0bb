"""Batching the causal velocity step across notes and sessions, synchronously.

A burst of events (note-ons, releases, pedal, session resets, from any number of sessions) is
applied in order; each note-on's velocity is exactly what stepping that session one note at a
time would give (``tests/models/velocity/test_batching.py`` holds them equal). The model runs once
per "round": a session appears at most once in a round, because its recurrent state advances
note by note. No event loop, no thread: :class:`cadenza.models.velocity.worker.VelocityWorker`
runs this inside the model runtime, and tests drive it directly.

Two forms of the step, chosen by the loader (``load_causal_step``):

* the numpy step (CPU), which also offers ``inputs``/``recur``/``hidden_side``/``head``: a burst
  shares its input-side and head calls, and with ``prepare_ahead`` each session's next
  hidden-side product is computed after its note went out (:meth:`prepare_next`), leaving only
  the gates and the head between a note and its answer;
* the torch step (GPU, or a static-shape/CUDA-graph step with the same interface): one batched
  ``step(x, state)`` per round, the sessions' states concatenated along ``state_batch_dim``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import (
    TYPE_CHECKING,
    Literal,
    Protocol,
    Union,
    runtime_checkable,
)

import numpy as np

from cadenza.models.runtime import SessionKey, StageStats

if TYPE_CHECKING:
    import torch

State = Union[np.ndarray, "torch.Tensor"]
Kind = Literal["on", "off", "pedal", "reset"]
VelocityEvent = tuple[Kind, SessionKey, float, int]
"""(kind, session, time, pitch or pedal value); ``reset`` forgets the session."""


class Featurizer(Protocol):
    """Per-session causal features (``LiveVelocityFeatures``)."""

    def note_on(self, t: float, pitch: int) -> np.ndarray: ...  # (F,)
    def note_off(self, t: float, pitch: int) -> None: ...
    def pedal(self, t: float, value: int) -> None: ...


class VelocityStep(Protocol):
    """The recurrent step: ``step(x (B, F), state) -> (velocity (B,), state)``."""

    def initial_state(self, batch: int) -> State: ...
    def step(self, x: State, state: State) -> tuple[State, State]: ...


@runtime_checkable
class SplitStep(Protocol):
    """The numpy step, split by what each part depends on (see ``NumpyCausalStep``)."""

    hidden: int

    def initial_state(self, batch: int) -> np.ndarray: ...
    def step(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def inputs(self, x: np.ndarray) -> np.ndarray: ...
    def hidden_side(self, state: np.ndarray) -> np.ndarray: ...
    def recur(self, g: np.ndarray, state: np.ndarray, gh: np.ndarray | None = None) -> np.ndarray: ...
    def head(self, h: np.ndarray, g: np.ndarray) -> np.ndarray: ...


class VelocityBatcher:
    """Per-session features and recurrent state; :meth:`apply` answers a burst's note-ons."""

    def __init__(
        self,
        model: VelocityStep,
        make_features: Callable[[], Featurizer],
        *,
        max_batch: int = 64,
        prepare_ahead: bool = False,
        stats: StageStats | None = None,
    ) -> None:
        self.model = model
        self.make_features = make_features
        self.max_batch = max_batch
        state = model.initial_state(1)
        self.numpy = isinstance(state, np.ndarray)
        self._device = None if self.numpy else state.device  # where a torch step's inputs go
        self.prepare_ahead = prepare_ahead and self.numpy
        self.stats = stats if stats is not None else StageStats()  # it counts ``prepared``
        self._features: dict[SessionKey, Featurizer] = {}
        self._states: dict[SessionKey, State] = {}
        # numpy step: each session's next hidden-side product, computed once its note has gone
        # out (the state it belongs to, the product); see prepare_next
        self._next: dict[SessionKey, tuple[np.ndarray, np.ndarray]] = {}
        self.to_prepare: set[SessionKey] = set()
        self._scratch: tuple[Featurizer, np.ndarray] | None = None  # keep_warm's featurizer and state
        self.scratch_n = 0

    def warm_up(self) -> None:
        feats = self.make_features()
        state = self.model.initial_state(1)
        for i in range(32):
            _, state = self.model.step(self._as_input([feats.note_on(i * 0.1, 60 + i % 12)]), state)

    def reset_all(self) -> None:
        self._features.clear()
        self._states.clear()
        self._next.clear()
        self.to_prepare.clear()

    # ---- a burst ------------------------------------------------------------------------------

    def apply(self, events: Sequence[VelocityEvent]) -> list[float]:
        """Apply the events in order; the velocities of their note-ons, in order."""
        values: list[float] = []
        notes: list[tuple[SessionKey, np.ndarray]] = []
        for kind, session, t, arg in events:
            if kind == "reset":
                values += self._infer_burst(notes)  # what came before the reset, with the state it had
                notes = []
                self._features.pop(session, None)
                self._states.pop(session, None)
                self._next.pop(session, None)
                continue
            feats = self._features.get(session)
            if feats is None:
                feats = self._features[session] = self.make_features()
            if kind == "on":
                notes.append((session, feats.note_on(t, arg)))
            elif kind == "off":
                feats.note_off(t, arg)
            else:
                feats.pedal(t, arg)
        return values + self._infer_burst(notes)

    def rounds(self, sessions: Sequence[SessionKey]) -> list[list[int]]:
        """Note indices grouped into rounds: a session at most once per round and after the
        round of its previous note (its state advances note by note), at most max_batch each."""
        rounds: list[list[int]] = []
        after: dict[SessionKey, int] = {}
        for i, s in enumerate(sessions):
            r = after.get(s, -1) + 1
            while r < len(rounds) and len(rounds[r]) >= self.max_batch:
                r += 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
            after[s] = r
        return rounds

    def _state(self, session: SessionKey) -> State:
        st = self._states.get(session)
        return self.model.initial_state(1) if st is None else st

    def _infer_burst(self, notes: list[tuple[SessionKey, np.ndarray]]) -> list[float]:
        if not notes:
            return []
        sessions = [s for s, _ in notes]
        if self.numpy:
            values = self._infer_numpy(notes, sessions)
        else:
            values = [0.0] * len(notes)
            for rnd in self.rounds(sessions):
                for i, v in zip(rnd, self._infer_round([notes[i] for i in rnd])):
                    values[i] = v
        return values

    def _infer_numpy(self, notes: list[tuple[SessionKey, np.ndarray]], sessions: list[SessionKey]) -> list[float]:
        """Note side once for the whole burst; the recurrence once per round, batched across the
        round's sessions; the head once. A session's hidden side is usually ready from after its
        previous note (:meth:`prepare_next`), which leaves the gates and the head between a note
        and its answer."""
        model = self.model
        assert isinstance(model, SplitStep)
        s = sessions[0]
        if len(notes) == 1 or sessions.count(s) == len(sessions):
            # one player: a note, or a chord on one channel — without the rounds' bookkeeping
            g = model.inputs(notes[0][1][None] if len(notes) == 1 else np.stack([x for _, x in notes]))
            state = self._state(s)
            h, self._states[s] = self.in_order(g, state, self._ready_next(s, state))
            values = model.head(h, g).tolist()
        else:
            g = model.inputs(np.stack([x for _, x in notes]))
            h = np.empty((len(notes), model.hidden), np.float32)
            for rnd in self.rounds(sessions):
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
        if self.prepare_ahead:
            self.to_prepare.update(sessions)  # the owner calls prepare_next once these went out
        return values

    def in_order(self, g: np.ndarray, state: np.ndarray, gh: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One session's notes (the rows of ``g``, from ``inputs``), note by note: each needs the
        state the last one left. ``gh`` is the first note's hidden side if already known.
        Returns the states after each note (N, H) and the last one (1, H)."""
        model = self.model
        assert isinstance(model, SplitStep)
        if len(g) == 1:
            h = model.recur(g, state, gh)
            return h, h
        rows = []
        for i in range(len(g)):
            state = model.recur(g[i : i + 1], state, gh)
            gh = None
            rows.append(state)
        return np.concatenate(rows), state

    def _ready_next(self, session: SessionKey, state: np.ndarray) -> np.ndarray | None:
        """The session's precomputed hidden side, if it belongs to this very state."""
        ready = self._next.pop(session, None)
        if ready is None or ready[0] is not state:
            return None
        self.stats.prepared += 1
        return ready[1]

    def prepare_next(self) -> None:
        """Numpy step, after the notes went out: each session's next hidden-side product (one
        product for all of them), so that its next note does not wait for it."""
        sessions, self.to_prepare = self.to_prepare, set()
        ready = [(s, st) for s in sessions if (st := self._states.get(s)) is not None]
        if ready:
            assert isinstance(self.model, SplitStep)
            gh = self.model.hidden_side(np.concatenate([st for _, st in ready]))
            for i, (s, state) in enumerate(ready):
                self._next[s] = (state, gh[i : i + 1])

    def keep_warm(self) -> None:
        """Numpy step, while idle: one scratch note through a private featurizer and state,
        answer discarded. On a machine where other processes (the synth, the DAW, JACK) run
        between notes, the weights and the feature code fall out of the caches and the next note
        costs several times more (``cadenza bench velocity``, rows live vs live_warm);
        ticking this every millisecond or so keeps them in. Every 4th call is a chord, whose path
        (4-row products, note-by-note recurrence) is otherwise cold when a chord comes. No
        session or statistic is touched."""
        model = self.model
        if not isinstance(model, SplitStep):
            return
        if self._scratch is None or self.scratch_n >= 512:
            self._scratch = (self.make_features(), model.initial_state(1))
            self.scratch_n = 0
        feats, state = self._scratch
        n = self.scratch_n
        t, pitch = 0.125 * n, 48 + (n * 7) % 36
        g = model.inputs(np.stack([feats.note_on(t, pitch + 4 * k) for k in range(1 if n % 4 else 4)]))
        h, state = self.in_order(g, state, None)
        model.head(h, g)
        self._scratch = (feats, state)
        self.scratch_n += 1

    # ---- the torch step -----------------------------------------------------------------------

    def _as_input(self, rows: list[np.ndarray]) -> State:
        x = np.stack(rows).astype(np.float32, copy=False)
        if self.numpy:
            return x
        import torch

        return torch.from_numpy(x).to(self._device)

    def _infer_round(self, notes: list[tuple[SessionKey, np.ndarray]]) -> list[float]:
        """One batched step for a round of distinct sessions."""
        import torch

        dim = getattr(self.model, "state_batch_dim", 0)
        sessions = [s for s, _ in notes]
        states = [self._state(s) for s in sessions]
        state = states[0] if len(states) == 1 else torch.cat(states, dim=dim)
        vel, new_state = self.model.step(self._as_input([x for _, x in notes]), state)
        for i, s in enumerate(sessions):
            self._states[s] = new_state.narrow(dim, i, 1)
        return vel.detach().cpu().numpy().tolist()
