"""Call and response: the interaction policy around the phrase model.

The performer plays a phrase (the call); when it ends — silence with no key down, an end-call CC,
or the next bar line when MIDI clock runs — the phrase model continues it and the engine
schedules the answer. The model runs in the model runtime's thread: every note the performer plays
is fed to it as it happens (so its KV cache is current and nothing is left to prefill when the
call ends), and it generates the response token by token, ahead of playback. Playing during a
response is a barge-in: the response stops (its sounding notes released) or ducks, as configured.
A model that crashes cuts its answer the same way; the runtime restarts it with backoff.

Every session (source) has its own call and response (:class:`CallResponse`: its performer, its
answer, its state, its controls) over the one :class:`PhraseStage`, which runs the phrase model
for all of them with a context per session. An answer is tagged with its session
(:class:`AnswerTag`) and goes out as that source.

States, reported on ``state_out_cc`` to each session: idle (0), listening (64), responding (127).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cadenza.config.settings import ControlSettings, PhraseSettings, Settings
from cadenza.messages import control, note_off
from cadenza.models.phrase.worker import (
    LivePhraseModel,
    PhraseJob,
    PhraseWorker,
    ResponseParams,
)
from cadenza.models.runtime import Event, ModelStage

if TYPE_CHECKING:
    from cadenza.stream.engine import Engine
    from cadenza.stream.session import Session

log = logging.getLogger(__name__)

IDLE, LISTENING, RESPONDING = 0, 64, 127
GRID_LEAD_S = 0.03  # on the clock, the call ends this long before the grid line its answer starts on


class AnswerTag(int):
    """Scheduler tag of one answer: its id (an int, unique across sessions, as sinks have always
    seen an answer's tag) that also knows the source it answers."""

    source: int

    def __new__(cls, gen_id: int, source: int) -> AnswerTag:
        tag = super().__new__(cls, gen_id)
        tag.source = source
        return tag


class PhraseStage:
    """The phrase model, shared by every session's :class:`CallResponse`."""

    def __init__(
        self, engine: Engine, settings: PhraseSettings, controls: ControlSettings, *, make_live: Callable[[], LivePhraseModel] | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.controls = controls
        self._make_live = make_live or _default_live(settings)
        self.worker: PhraseWorker | None = None
        self.ids = itertools.count(1)  # answer ids, unique across sessions

    def session(self, session: Session) -> CallResponse:
        """A new session's call and response."""
        return CallResponse(self, session)

    def _calls(self) -> list[CallResponse]:
        return [s.phrase for s in list(self.engine.sessions.values()) if s.phrase is not None]

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.worker = PhraseWorker(self._make_live, self.engine._loop)
        await asyncio.to_thread(self.worker.start)
        self.worker.stage.listen(self._model_event)
        for cr in self._calls():
            cr._set_state(IDLE)

    def _model_event(self, event: Event, stage: ModelStage[PhraseJob]) -> None:
        """The model crashed: cut the answers in flight, releasing what they left sounding. The
        runtime restarts it (with empty contexts); the next phrase is answered again."""
        if event == "crash":
            for cr in self._calls():
                cr.cancel_response(release=True)

    async def run(self) -> None:
        """Nothing to poll: timers drive it. Kept as a task so its lifetime is the engine's."""
        await asyncio.Event().wait()

    def forget(self, source: int) -> None:
        """A session has ended: its context in the model goes."""
        if self.worker is not None:
            self.worker.forget(source)

    def close(self) -> None:
        for cr in self._calls():
            cr.close()
        if self.worker is not None:
            self.worker.stop()


class CallResponse:
    """One session's call and response: its performer's phrase, the answer, the controls."""

    def __init__(self, stage: PhraseStage, session: Session) -> None:
        self.stage = stage
        self.engine = stage.engine
        self.settings = stage.settings
        self.controls = stage.controls
        self.source = session.source
        self.clock = session.clock
        self.enabled = True
        self.temperature = self.settings.temperature
        self.length_s: float | None = None  # set by the length CC; overrides the configured mode
        self.state = IDLE
        self._keys_down: set[tuple[int, int]] = set()
        self._call_start: float | None = None
        self._call_channel = 0
        self._last_activity = 0.0
        self._silence: asyncio.TimerHandle | None = None
        self._gen: AnswerTag | None = None
        self._cancel: threading.Event | None = None
        self._phrase_end_wall: float | None = None
        self._sounding: set[tuple[int, int]] = set()
        self._pedal: set[int] = set()  # channels where the answer holds the sustain pedal down
        self._ducked = False
        self._start_t = 0.0
        self._shift: float | None = None  # first note's sampled delay, removed from the answer
        self._held: list[tuple[float, bytes]] = []

    @property
    def worker(self) -> PhraseWorker:
        """The shared model worker (one for all sessions)."""
        assert self.stage.worker is not None, "phrase stage not started"
        return self.stage.worker

    def announce(self) -> None:
        """A new session: say it is idle (on the state CC), once the stage runs (its start
        says so for the sessions there before)."""
        if self.stage.worker is not None:
            self._set_state(IDLE)

    def close(self) -> None:
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        if self._cancel is not None:
            self._cancel.set()

    # ---- performer input --------------------------------------------------------------------

    def performer_note_on(self, t: float, data: bytes) -> None:
        """A key went down (in input order: its note-off, even in the same batch, comes after)."""
        if self.state == RESPONDING:
            self._barge_in()
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        if self.enabled:
            self._keys_down.add((data[0] & 0x0F, data[1]))

    def feed_output(self, t: float, data: bytes) -> None:
        """A performer note-on as it went out (with its final velocity): part of the call."""
        if not self.enabled:
            return
        if self._call_start is None:
            self._call_start = t
            self._call_channel = data[0] & 0x0F
            self._set_state(LISTENING)
        self._last_activity = t
        self.worker.feed(self.source, t, data)
        if not self._keys_down:  # its key went up before it went out (one batch): count silence from here
            self._arm_silence()

    def performer_event(self, t: float, data: bytes, *, note_off: bool = False) -> None:
        if not self.enabled:
            return
        self.worker.feed(self.source, t, data)
        if note_off:
            self._keys_down.discard((data[0] & 0x0F, data[1]))
            self._last_activity = t
            if not self._keys_down and self._call_start is not None:
                self._arm_silence()

    def is_end_cc(self, data: bytes) -> bool:
        return self.settings.end_cc is not None and data[1] == self.settings.end_cc and data[2] >= 64

    def _grid_beats(self) -> float | None:
        """Grid unit in beats while MIDI clock runs and the grid is on; None otherwise."""
        clock, grid = self.clock, self.settings.grid
        if grid == "none" or not clock.running or clock.seconds_per_beat is None:
            return None
        return float(clock.beats_per_bar) if grid == "bar" else 1.0

    def _arm_silence(self) -> None:
        loop = self.engine._loop
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        if not self.engine.realtime:
            return
        unit = self._grid_beats()
        if unit is None:
            self._silence = loop.call_later(self.settings.silence_ms / 1000.0, self._silence_elapsed)
            return
        # On the clock the phrase ends on the first grid line at least a sixteenth after the
        # last key went up (a key down there keeps the phrase going). The call ends a little
        # before the line, so the first answering note can be ready on it.
        now = self.engine.now_music()
        spb = self.clock.seconds_per_beat
        line = self.clock.next_grid_time(now + spb / 4, unit_beats=unit)
        self._silence = loop.call_at(max(now, line - GRID_LEAD_S), self._grid_line, line)

    def _silence_elapsed(self) -> None:
        self._silence = None
        if not self._keys_down and self._call_start is not None:
            self.end_call(self._last_activity + self.settings.silence_ms / 1000.0)

    def _grid_line(self, line: float) -> None:
        self._silence = None
        if not self._keys_down and self._call_start is not None:
            self.end_call(line, start=line)

    # ---- the response -----------------------------------------------------------------------

    def end_call(self, t: float, start: float | None = None) -> None:
        """The phrase is over at music time ``t``: answer it from ``start`` (default: now, or
        the next grid line while MIDI clock runs)."""
        if self._call_start is None or not self.enabled or self.state == RESPONDING:
            return
        self._phrase_end_wall = time.monotonic()
        call_len = max(0.5, t - self._call_start)
        clock = self.clock
        spb = clock.seconds_per_beat
        if start is None:
            unit = self._grid_beats()
            start = t if unit is None else clock.next_grid_time(self.engine.now_music(), unit_beats=unit)
        s = self.settings
        if self.length_s is not None:
            seconds = self.length_s
        elif s.length_mode == "seconds":
            seconds = s.response_seconds
        elif s.length_mode == "bars" and spb is not None:
            seconds = s.response_bars * clock.beats_per_bar * spb
        else:
            seconds = min(call_len, s.max_response_s)
        self._call_start = None
        self._keys_down.clear()
        gen_id = AnswerTag(next(self.stage.ids), self.source)
        self._gen = gen_id
        self._cancel = threading.Event()
        self._sounding.clear()
        self._ducked = False
        self._start_t = start
        self._shift = None
        self._held = []
        self._set_state(RESPONDING)
        params = ResponseParams(start_t=start, seconds=seconds, temperature=self.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
        log.debug("call ended at %.3f: responding %.2f s from %.3f", t, seconds, start)
        self.worker.respond(self.source, gen_id, self._cancel, params, self._on_event, self._on_done)

    def _on_event(self, gen_id: int, t: float, msg: bytes) -> None:
        if gen_id != self._gen:
            return
        ch = self._call_channel if self.settings.out_channel is None else self.settings.out_channel
        if msg[0] < 0xF0:
            msg = bytes((msg[0] & 0xF0 | ch,)) + msg[1:]
        # The answer starts on its start time (the phrase end or the grid), not after a rest the
        # model happened to sample first: hold events until the first note-on, then shift all.
        if self._shift is None:
            self._held.append((t, msg))
            if msg[0] & 0xF0 != 0x90:
                return
            self._shift = t - self._start_t
            held, self._held = self._held, []
            for t0, m in held:
                self.engine.scheduler.schedule(max(self._start_t, t0 - self._shift), m, gen_id)
            return
        self.engine.scheduler.schedule(t - self._shift, msg, gen_id)

    def on_scheduled(self, data: bytes, tag: object) -> bytes | None:
        """A response event is due: apply ducking, track its notes, stamp time-to-first-note."""
        if tag != self._gen:
            return None if (data[0] & 0xF0) == 0x90 and data[2] > 0 else data
        kind = data[0] & 0xF0
        if kind == 0x90 and data[2] > 0:
            if self._ducked:
                data = bytes((data[0], data[1], max(1, int(data[2] * self.settings.duck_factor))))
            self._sounding.add((data[0] & 0x0F, data[1]))
            if self._phrase_end_wall is not None:
                self.engine.metrics.observe("ttfn", time.monotonic() - self._phrase_end_wall)
                self._phrase_end_wall = None
        elif kind == 0x80 or kind == 0x90:
            self._sounding.discard((data[0] & 0x0F, data[1]))
        elif kind == 0xB0 and data[1] == 64:
            if data[2] >= 64:
                self._pedal.add(data[0] & 0x0F)
            else:
                self._pedal.discard(data[0] & 0x0F)
        return data

    def _on_done(self, gen_id: int) -> None:
        if gen_id != self._gen:
            return
        # Generation is complete; the state returns to idle once the last event has played.
        sched = self.engine.scheduler
        remaining = sched.pending(gen_id)
        if remaining == 0 or not sched.realtime:
            self._finish()
        else:
            self.engine._loop.call_later(0.05, self._on_done, gen_id)

    def _finish(self) -> None:
        self._gen = None
        self._set_state(LISTENING if self._call_start is not None else IDLE)

    def _barge_in(self) -> None:
        self.engine.metrics.inc("barge_in")
        if self.settings.barge_in == "duck":
            self._ducked = True
            return
        self.cancel_response(release=True)

    def cancel_response(self, *, release: bool) -> None:
        """Stop the response in flight; with ``release``, send note-offs for its sounding notes
        and lift the pedal if it pressed it (a cut-short answer never gets its own release)."""
        if self._gen is None:
            return
        gen_id = self._gen
        if self._cancel is not None:
            self._cancel.set()
        self.engine.scheduler.cancel(gen_id)
        if release:
            for ch, pitch in sorted(self._sounding):
                self.engine._emit(self.engine.now_music(), note_off(ch, pitch), "release", self.source)
            for ch in sorted(self._pedal):
                self.engine._emit(self.engine.now_music(), control(ch, 64, 0), "release", self.source)
        self._sounding.clear()
        self._pedal.clear()
        self._finish()

    # ---- performer controls -----------------------------------------------------------------

    def set_temperature(self, value: float) -> None:
        self.temperature = value

    def set_length(self, seconds: float) -> None:
        self.length_s = seconds

    def set_enabled(self, on: bool) -> None:
        if not on:
            self.cancel_response(release=True)
            self._call_start = None
        self.enabled = on
        self._set_state(IDLE)

    def _set_state(self, state: int) -> None:
        self.state = state
        cc = self.controls.state_out_cc
        if cc is not None:
            ch = self.controls.channel or 0
            self.engine._emit(self.engine.now_music(), control(ch, cc, state), "state", self.source)


def _default_live(settings: PhraseSettings) -> Callable[[], LivePhraseModel]:
    def make() -> LivePhraseModel:
        from cadenza.models.phrase.answer import options_from
        from cadenza.models.phrase.live import LivePhrase, load_phrase
        from cadenza.models.runtime import pick_device

        # best-of-N and the guards come from [phrase] (best_of, lookahead_*, fit_*, *_guard)
        return LivePhrase(
            load_phrase(settings.weights, device=pick_device(settings.device)),
            style=settings.style,
            answer=options_from(settings),
            paced=True,
        )

    return make


def build_phrase_stage(engine: Engine, settings: Settings) -> PhraseStage:
    return PhraseStage(engine, settings.phrase, settings.controls)
