"""Vary: the performer plays a loop, Cadenza plays it back changed, bar-aligned, on its own channel.

The loop is ``vary.bars`` bars (2 for ``mel_2bar``, 16 for ``mel_16bar``) on the sixteenth grid of
the MIDI clock, or without a clock at ``engine.bpm`` counted from the first note played. Half a
sixteenth before each loop boundary the stage reads the loop just played from the engine's
piano-roll window (its top voice), hands it to the MusicVAE in the model runtime, and schedules
the answer from the boundary on:

* ``vary``: the loop's latent code plus noise (``vary.amount``, or the amount CC);
* ``morph``: when a new loop comes in, a path from what was playing to it over
  ``vary.morph_repeats`` repetitions;
* attribute CCs (density, interval, register, syncopation) move the code along the attribute
  vectors shipped with the weights, applied to whatever is played.

Reading half a step early centres each sixteenth on its grid line (a note played a little early
still counts for its beat) and leaves the model that half step to answer; an answer that is not
back by the boundary is counted late and plays from where the loop is by then. The answer's notes go through
the engine (ledger, sinks) like every other output, so panic, a mode switch or shutdown release
them; a loop with fewer than ``vary.min_notes`` notes ends the variation (and releases it).

Every session (source) has its own loop (:class:`VaryLoop`: its grid on its own MIDI clock, its
controls, its answers, tagged with its source) over the one :class:`VaryStage`, which runs the
MusicVAE for all of them (a latent path per session). The VAE encodes and decodes one loop at a
time: the loops of several sessions read in the same burst are run one after another.

States, reported on ``state_out_cc`` to each session: idle (0), listening (64), playing (127).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cadenza.config.settings import ControlSettings, Settings, VarySettings
from cadenza.messages import control, note_off, note_on
from cadenza.models.runtime import Event, ModelStage

if TYPE_CHECKING:
    from cadenza.models.vae.live import VAE
    from cadenza.models.vae.worker import VaeJob
    from cadenza.stream.engine import Engine
    from cadenza.stream.session import Session

log = logging.getLogger(__name__)

IDLE, LISTENING, PLAYING = 0, 64, 127
ATTRIBUTES = ("density", "interval", "register", "syncopation")


@dataclass(frozen=True)
class VaryTag:
    """Scheduler tag of one loop's answer: the source it answers; cancelled as a whole."""

    source: int
    gen: int


class VaryStage:
    """The MusicVAE, shared by every session's :class:`VaryLoop`."""

    def __init__(
        self, engine: Engine, settings: VarySettings, controls: ControlSettings, *, load_vae: Callable[[], VAE] | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.controls = controls
        self._load_vae = load_vae or _default_vae(settings)
        self.stage: ModelStage[VaeJob] | None = None
        self.steps = 0  # sixteenths in a loop (the model's length)

    def session(self, session: Session) -> VaryLoop:
        return VaryLoop(self, session)

    def _loops(self) -> list[VaryLoop]:
        return [s.vary for s in list(self.engine.sessions.values()) if s.vary is not None]

    async def start(self) -> None:
        from cadenza.models.vae.worker import VaeHandler

        handler = VaeHandler(self._load_vae)
        # Its own thread by default: an encode + decode takes milliseconds (`cadenza bench vae`),
        # and the performer's notes pass through the loop meanwhile.
        self.stage = ModelStage(handler, name="vae", inline=self.settings.inline)
        await asyncio.to_thread(self.stage.start, self.engine._loop)
        assert handler.vae is not None
        self.steps = handler.vae.steps
        bars = self.steps // 16
        beats_per_bar = self.engine.settings.engine.beats_per_bar
        if bars * beats_per_bar * 4 != self.steps:
            log.warning("vary: %s is %d bars of 4/4; engine.beats_per_bar is %d", self.settings.model, bars, beats_per_bar)
        self.stage.listen(self._model_event)

    def _model_event(self, event: Event, stage: ModelStage[VaeJob]) -> None:
        if event == "crash":
            for loop in self._loops():
                loop.cancel(release=True)

    def forget(self, source: int) -> None:
        """A session has ended: its latent paths in the model go."""
        from cadenza.models.vae.worker import Forget

        if self.stage is not None:
            self.stage.submit(Forget(source))
            self.stage.flush()

    def close(self) -> None:
        for loop in self._loops():
            loop.close()
        if self.stage is not None:
            self.stage.stop()


class VaryLoop:
    """One session's loop: read on its grid, varied by the shared model, played back to it."""

    def __init__(self, stage: VaryStage, session: Session) -> None:
        settings = stage.settings
        self.vary_stage = stage
        self.engine = stage.engine
        self.settings = settings
        self.controls = stage.controls
        self.source = session.source
        self.clock = session.clock
        self.session = session
        self.mode = settings.mode
        self.amount = settings.amount
        self.attributes = {name: 0.0 for name in ATTRIBUTES}
        self.state = IDLE
        self._channel: int | None = None  # the channel the loop is read from
        self._anchor: float | None = None  # without a clock: the first note's time, bar 1 beat 1
        self._timer: asyncio.TimerHandle | None = None
        self._boundary_beat: float | None = None  # with a clock: the next loop line, in the clock's beats
        self._gens = itertools.count(1)
        self._gen: int | None = None  # the answer playing
        self._scheduled: set[int] = set()  # answers with events still in the scheduler
        self._dropped_before = 0  # answers of loops read before this gen are not played (reset)
        self._seeds = itertools.count(settings.seed)
        self._sounding: set[int] = set()  # pitches of the answer sounding now

    @property
    def stage(self) -> ModelStage[VaeJob] | None:
        return self.vary_stage.stage

    @property
    def steps(self) -> int:
        return self.vary_stage.steps

    def close(self) -> None:
        self._disarm()

    # ---- the grid ---------------------------------------------------------------------------

    def _step_s(self) -> float:
        spb = self.clock.seconds_per_beat if self.clock.running else None
        return (spb if spb is not None else 60.0 / self.engine.settings.engine.bpm) / 4

    def _next_boundary(self, now: float) -> float:
        """The next loop boundary after ``now`` (a bar line that starts a loop)."""
        clock = self.clock
        loop_beats = self.steps / 4
        if clock.running and clock.seconds_per_beat is not None:
            return clock.next_grid_time(now, unit_beats=loop_beats)
        loop_s = self.steps * self._step_s()
        assert self._anchor is not None
        return self._anchor + loop_s * (math.floor((now - self._anchor) / loop_s + 1e-9) + 1)

    def _ahead_steps(self) -> int:
        """How far before a loop boundary the loop is read. A 2-bar loop is read half a step
        early (a short decode); a 16-bar one a bar early, so its long decode is done before the
        boundary: its last bar is then taken from the previous repetition of the loop."""
        return 16 if self.steps > 32 else 0

    def _arm(self, boundary: float) -> None:
        """Read the loop before ``boundary``. With a clock the line is kept as a beat and turned
        into a time again when the read is due: extrapolated across a whole loop, a tempo read
        from one beat of jittery ticks misses the line by tens of milliseconds."""
        self._disarm()
        clock = self.clock
        beat = clock.beat_at(boundary)
        loop_beats = self.steps / 4
        self._boundary_beat = None if beat is None else round(beat / loop_beats) * loop_beats
        self._timer = self.engine._loop.call_at(max(self.engine.now_music(), self._read_time(boundary)), self._read_loop, boundary)

    def _read_time(self, boundary: float) -> float:
        return boundary - (self._ahead_steps() + 0.5) * self._step_s()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- performer input --------------------------------------------------------------------

    def performer_note_on(self, t: float, channel: int) -> None:
        """A note of the performer's: the first one after silence starts the loop grid."""
        if self.stage is None or self._timer is not None:
            return  # already counting loops (one loop at a time: the channel that started it)
        self._channel = channel
        clock = self.clock
        if clock.running and clock.seconds_per_beat is None:
            # the clock has just started and its tempo is not known yet: count from the next
            # loop line of the clock's grid once it is (the loop was started on the clock)
            self._timer = self.engine._loop.call_later(0.05, self._wait_for_tempo)
        else:
            if not clock.running:
                self._anchor = t  # free time: the loop starts on this note
            self._arm(self._next_boundary(t))
        if self.state == IDLE:
            self._set_state(LISTENING)

    def _wait_for_tempo(self) -> None:
        self._timer = None
        clock = self.clock
        if clock.running and clock.seconds_per_beat is None:
            self._timer = self.engine._loop.call_later(0.05, self._wait_for_tempo)
        elif clock.running:
            self._arm(self._next_boundary(self.engine.now_music()))
        else:
            self.reset()  # the clock stopped before it had a tempo: start again at the next note

    def _read_loop(self, boundary: float) -> None:
        """Half a step before ``boundary``: the loop just played goes to the model."""
        self._timer = None
        assert self.stage is not None and self._channel is not None
        if self._boundary_beat is not None:
            fresh = self.clock.time_at_beat(self._boundary_beat)
            if fresh is not None:  # the clock's line, from its latest ticks
                boundary = fresh
                read_at = self._read_time(boundary)
                if read_at > self.engine.now_music() + 0.002:  # the estimate was early: wait for it
                    self._timer = self.engine._loop.call_at(read_at, self._read_loop, boundary)
                    return
        step_s = self._step_s()
        ahead = self._ahead_steps()
        end = boundary - (ahead + 0.5) * step_s  # half a step early: each step centred on its grid line
        try:
            events = self.session.melody_at(self._channel, end, self.steps - ahead, step_s)
            if ahead:  # the loop's last bar, as it was played one repetition ago
                last = self.session.melody_at(self._channel, end - (self.steps - ahead) * step_s, ahead, step_s)
                events = np.concatenate([events, last])
        except ValueError as exc:  # the loop is longer than the window at this tempo
            log.warning("vary: %s; raise engine.window_s", exc)
            self.reset()
            return
        events = to_vae_events(events)
        if int(np.count_nonzero(events >= 2)) < self.settings.min_notes:
            log.debug("vary: loop before %.3f has too few notes; stopping", boundary)
            self._channel = None  # what plays now ends on its own at the boundary
            self.engine._loop.call_at(boundary, self._idle_if_stopped)
            return
        from cadenza.models.vae.worker import VaryJob

        fut: asyncio.Future = self.engine._loop.create_future()
        job = VaryJob(
            session=(self.source, self._channel),
            events=events,
            mode=self.mode,
            amount=self.amount,
            repeats=self.settings.morph_repeats,
            attributes=dict(self.attributes),
            temperature=self.settings.temperature,
            seed=next(self._seeds),
            future=fut,
        )
        gen = next(self._gens)
        fut.add_done_callback(lambda f: self._answer(f, gen, boundary, step_s))
        self.stage.submit(job, deadline=time.monotonic() + max(0.0, boundary - self.engine.now_music()))
        self.stage.flush()
        self._arm(boundary + self.steps * step_s)  # keep reading, loop after loop

    def _idle_if_stopped(self) -> None:
        if self._timer is None:  # no new loop was started meanwhile
            self._set_state(IDLE)

    def _answer(self, fut: asyncio.Future, gen: int, boundary: float, step_s: float) -> None:
        metrics = self.engine.metrics
        if gen < self._dropped_before:
            return  # read before a panic or mode switch: not wanted any more
        if fut.cancelled():
            metrics.inc("deadline_miss")
            return
        events, _z = fut.result()
        now = self.engine.now_music()
        metrics.observe("vary_lead", max(0.0, boundary - now))  # how long before its line the answer was ready
        if now > boundary:
            metrics.inc("vary_late")  # it still plays from where the loop is now; what is past is skipped
        from cadenza.models.vae.live import events_to_notes

        ch = self.settings.out_channel
        sched = self.engine.scheduler
        self._gen = gen
        self._scheduled = {g for g in self._scheduled if g >= gen - 1} | {gen}  # older ones have played out
        tag = VaryTag(self.source, gen)
        for t_on, t_off, pitch in events_to_notes(events, step_s):
            if boundary + t_on < now:
                continue
            sched.schedule(boundary + t_on, note_on(ch, pitch, self.settings.velocity), tag)
            # ends a hair before the next loop's notes, so a repeated pitch re-strikes cleanly
            sched.schedule(boundary + min(t_off, self.steps * step_s) - 0.001, note_off(ch, pitch), tag)
        self._set_state(PLAYING)

    def on_scheduled(self, data: bytes, tag: VaryTag) -> bytes | None:
        """An answer event is due: keep what is sounding (for a clean cut)."""
        if (data[0] & 0xF0) == 0x90 and data[2] > 0:
            if tag.gen != self._gen:
                return None  # an older loop's note that a newer answer replaced
            self._sounding.add(data[1])
        elif (data[0] & 0xF0) in (0x80, 0x90):
            if data[1] not in self._sounding:
                return None
            self._sounding.discard(data[1])
        return data

    def cancel(self, *, release: bool) -> None:
        """Stop what plays: pending answer events dropped; with ``release``, note-offs for the
        notes it left sounding (the engine's panic releases them itself)."""
        for gen in self._scheduled:
            self.engine.scheduler.cancel(VaryTag(self.source, gen))
        self._scheduled.clear()
        if release:
            ch = self.settings.out_channel
            for pitch in sorted(self._sounding):
                self.engine._emit(self.engine.now_music(), note_off(ch, pitch), "release", self.source)
        self._sounding.clear()

    def reset(self) -> None:
        """Panic or mode switch: nothing plays, the grid waits for the next note."""
        self._disarm()
        self._dropped_before = next(self._gens)  # answers still in the model are dropped
        self.cancel(release=False)
        self._channel = None
        self._set_state(IDLE)

    # ---- performer controls -----------------------------------------------------------------

    def set_amount(self, value: float) -> None:
        self.amount = value

    def set_attribute(self, name: str, amount: float) -> None:
        self.attributes[name] = amount

    def set_mode(self, mode: str) -> None:
        self.mode = mode  # type: ignore[assignment]

    def _set_state(self, state: int) -> None:
        if state == self.state:
            return
        self.state = state
        cc = self.controls.state_out_cc
        if cc is not None:
            self.engine._emit(self.engine.now_music(), control(self.controls.channel or 0, cc, state), "state", self.source)


def to_vae_events(window_events: np.ndarray) -> np.ndarray:
    """The window's melody events (``buffers.pianoroll.melody_event``) in the VAE's encoding:
    the same grid and note-offs, pitches folded by octaves into the model's range."""
    from cadenza.buffers.pianoroll import MIN_PITCH
    from cadenza.models.vae.data import LO, fold_pitches

    out = np.asarray(window_events, np.int64).copy()
    on = out >= 2
    out[on] = fold_pitches(out[on] - 2 + MIN_PITCH) - LO + 2
    return out


def _default_vae(settings: VarySettings) -> Callable[[], VAE]:
    def load() -> VAE:
        from cadenza.models.vae.live import load_vae

        return load_vae(settings.model)

    return load


def build_vary_stage(engine: Engine, settings: Settings) -> VaryStage:
    return VaryStage(engine, settings.vary, settings.controls)
