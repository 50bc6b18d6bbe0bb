"""The engine: one asyncio loop that moves MIDI from sources, through the stages, to sinks.

Sources call :meth:`Engine.deliver` from any thread with ``(arrival time, bytes)``; that is one
``call_soon_threadsafe``. On the loop, the input queue is bounded: when full, note-ons (and other
droppable kinds) are dropped and counted; note-offs, controllers (pedal) and clock never are.

The pump drains what is queued, asks the velocity worker for every note-on in one go, waits at
most until the earliest note's deadline, and emits everything in input order — a controller that
followed a note-on never overtakes it. Every outgoing message passes the open-note ledger, so
``panic()`` can always release exactly what is sounding.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from cadenza.buffers.clock import MidiClock
from cadenza.buffers.ledger import NoteLedger
from cadenza.buffers.pianoroll import PianoRollWindow
from cadenza.config.settings import Settings
from cadenza.messages import NEVER_DROP, Kind, classify
from cadenza.models.velocity.worker import VelocityWorker
from cadenza.stream import tasks as background
from cadenza.stream.controls import control_map
from cadenza.stream.lookahead import LookaheadNote
from cadenza.stream.metrics import Metrics
from cadenza.stream.scheduler import OutputScheduler
from cadenza.stream.sinks import AnySink, Sinks
from cadenza.stream.vary import VaryTag
from cadenza.stream.velocity_stage import VelocityStage, is_down

if TYPE_CHECKING:
    from cadenza.models.velocity.worker import VelocityWorker
    from cadenza.stream.lookahead import LookaheadStage
    from cadenza.stream.phrase import PhraseStage
    from cadenza.stream.vary import VaryStage

log = logging.getLogger(__name__)


class Engine:
    """Assembled by :func:`cadenza.stream.build.build_engine`, which starts and stops its stages.

    ``velocity_worker`` colorizes note-ons, ``lookahead`` delays everything by a fixed time for
    the full-context model, ``phrase_factory(engine)`` makes the phrase stage (it needs the
    engine to emit its answers); each is None when the mode does not use it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sinks: list[AnySink],
        velocity_worker: VelocityWorker | None = None,
        lookahead: LookaheadStage | None = None,
        phrase_factory: Callable[[Engine], PhraseStage] | None = None,
        vary_factory: Callable[[Engine], VaryStage] | None = None,
        realtime: bool = True,
    ) -> None:
        self.settings = settings
        self.sinks = Sinks(sinks)  # more may be added (serve adds the audio sink once the ports are open)
        self.metrics = Metrics()
        self.ledger = NoteLedger()  # source 0's (the ports'); other sources get their own
        self._ledgers: dict[int, NoteLedger] = {0: self.ledger}
        self.clock = MidiClock(beats_per_bar=settings.engine.beats_per_bar)
        self.velocity = VelocityStage(settings.velocity, velocity_worker)
        self.realtime = realtime
        self.lookahead = lookahead
        self._queue: deque = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scheduler: OutputScheduler | None = None
        self._rolls: dict[tuple[int, int], PianoRollWindow] = {}  # per (source, channel)
        self._control_map = control_map(settings)
        self._idle = asyncio.Event()
        self.last_pump = 0.0  # when the pump last took a batch (monotonic)
        self._idle.set()
        self.phrase: PhraseStage | None = None
        if phrase_factory is not None:
            self.phrase = phrase_factory(self)
        self.vary: VaryStage | None = vary_factory(self) if vary_factory is not None else None

    # ---- wiring -----------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.scheduler = OutputScheduler(loop, self._emit_scheduled, realtime=self.realtime)

    def deliver(self, t: float, data: bytes, *, source: int = 0, music_t: float | None = None) -> None:
        """Hand one message to the loop; safe from any thread (the rtmidi callback calls this)."""
        self._loop.call_soon_threadsafe(self._enqueue, t, data, source, t if music_t is None else music_t)

    def deliver_now(self, t: float, data: bytes, *, source: int = 0, music_t: float | None = None) -> None:
        """Like :meth:`deliver`, for callers already on the loop thread."""
        self._enqueue(t, data, source, t if music_t is None else music_t)

    def _enqueue(self, t: float, data: bytes, source: int, music_t: float) -> None:
        self.metrics.inc("in")
        kind = classify(data, sysex_max=self.settings.midi.sysex_max_bytes)
        if kind is None:
            self.metrics.inc("dropped")
            self.metrics.inc("dropped_malformed")
            return
        if kind is Kind.REALTIME:
            self.metrics.inc("consumed")
            return  # active sensing and friends are link-level; not forwarded
        if len(self._queue) >= self.settings.engine.input_queue and kind not in NEVER_DROP:
            self.metrics.inc("dropped")
            self.metrics.inc("dropped_queue_full")
            return
        self._queue.append((t, data, kind, source, music_t))
        self._idle.clear()
        self._wake.set()

    # ---- the pump ---------------------------------------------------------------------------

    async def _pump(self) -> None:
        loop = self._loop
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            batch = []
            while self._queue and len(batch) < 256:
                batch.append(self._queue.popleft())
            self.metrics.gauge("queue_depth", len(self._queue))
            out: list[list] = []  # [data, future|None, player_velocity, t_arrival, music_t, source]
            asked = []
            t_pump = time.monotonic()
            self.last_pump = t_pump
            self.metrics.observe("input_wait", t_pump - batch[0][0])  # arrival -> the pump has it
            for t, data, kind, source, music_t in batch:
                entry = self._process(t, data, kind, source, music_t)
                if entry is None:
                    continue
                out.append(entry)
                fut = entry[1]
                if fut is not None and not is_down(fut):
                    asked.append((t, fut))
            if asked:
                self.velocity.flush()  # an inline worker answers here; a thread is already at it
                self.metrics.observe("velocity", time.monotonic() - t_pump)  # features + model (inline) or submit
            waiting = [fut for _, fut in asked if not fut.done()]
            earliest = min((t for t, fut in asked if not fut.done()), default=None)
            if waiting:
                t_submit = loop.time()
                timeout = max(0.0, earliest + self.velocity.deadline_s - t_submit)
                await asyncio.wait(waiting, timeout=timeout)
                self.metrics.observe("model", loop.time() - t_submit)
            for data, fut, player_vel, t, music_t, source in out:
                if fut is not None:
                    value = None
                    if not is_down(fut) and fut.done() and not fut.cancelled():
                        value = fut.result()
                    if value is None or time.monotonic() - t > self.velocity.deadline_s:
                        # no answer in time (or an inline answer that took longer than the deadline)
                        self.metrics.inc("deadline_miss")
                    data = bytes((data[0], data[1], self.velocity.combine(player_vel, value)))
                self._emit(music_t, data, None, source)
                self.metrics.observe("internal", time.monotonic() - t)

    def _roll(self, source: int, channel: int) -> PianoRollWindow:
        """The channel's window, made at its first note (channels that only send controllers have none)."""
        roll = self._rolls.get((source, channel))
        if roll is None:
            eng = self.settings.engine
            roll = self._rolls[(source, channel)] = PianoRollWindow(frame_s=eng.frame_ms / 1000, window_s=eng.window_s)
        return roll

    def _process(self, t: float, data: bytes, kind: Kind, source: int, music_t: float) -> list | None:
        """Update state for one input message; return its output entry, or None if consumed."""
        if kind is Kind.CLOCK or kind is Kind.TRANSPORT or (kind is Kind.COMMON and data[0] == 0xF2):
            self.clock.handle(music_t, data)
            return [data, None, 0, t, music_t, source]
        if kind > Kind.PITCH_BEND:
            return [data, None, 0, t, music_t, source]
        ch = data[0] & 0x0F
        session = (source, ch)
        if self.lookahead is not None and not self._is_control(data, kind, ch):
            self._delay(t, data, kind, session, music_t)
            return None
        cr = self.phrase
        if kind is Kind.NOTE_ON:
            self.metrics.inc("note_on")
            self._roll(source, ch).note_on(music_t, data[1], data[2])
            if cr is not None:
                cr.performer_note_on(music_t)
            if self.vary is not None:
                self.vary.performer_note_on(music_t, session)
            fut = self.velocity.request(session, music_t, data[1], data[2])
            return [data, fut, data[2], t, music_t, source]
        if kind is Kind.NOTE_OFF:
            self._roll(source, ch).note_off(music_t, data[1])
            self.velocity.note_off(session, music_t, data[1])
            if cr is not None:
                cr.performer_event(music_t, data, note_off=True)
            return [data, None, 0, t, music_t, source]
        if kind is Kind.CONTROL:
            handler = self._control_map.get(data[1])
            ctl_ch = self.settings.controls.channel
            if handler is not None and (ctl_ch is None or ctl_ch == ch):
                handler(self, data[2])
                if self.settings.controls.consume:
                    self.metrics.inc("consumed")
                    return None
            if data[1] == 64:
                self.velocity.pedal(session, music_t, data[2])
                if cr is not None:
                    cr.performer_event(music_t, data)
            elif cr is not None and cr.is_end_cc(data):
                cr.end_call(music_t)
        return [data, None, 0, t, music_t, source]

    def _is_control(self, data: bytes, kind: Kind, ch: int) -> bool:
        ctl_ch = self.settings.controls.channel
        return kind is Kind.CONTROL and data[1] in self._control_map and (ctl_ch is None or ctl_ch == ch)

    def _delay(self, t: float, data: bytes, kind: Kind, session, music_t: float) -> None:
        """Lookahead mode: everything leaves exactly S after it came in; note-ons get the
        full-context model's velocity when they are due."""
        la = self.lookahead
        tag = None
        if kind is Kind.NOTE_ON:
            self.metrics.inc("note_on")
            tag = la.note_on(session, music_t, data[1])
        elif kind is Kind.NOTE_OFF:
            la.note_off(session, music_t, data[1])
        elif kind is Kind.CONTROL and data[1] == 64:
            la.pedal(session, music_t, data[2])
        self.scheduler.schedule(t + la.seconds, data, tag)

    # ---- output -----------------------------------------------------------------------------

    def _emit(self, music_t: float, data: bytes, tag: object, source: int = 0) -> None:
        self.sinks.send(source, data, music_t, tag)
        ledger = self.ledger if source == 0 else self._ledgers.get(source)
        if ledger is None:
            ledger = self._ledgers[source] = NoteLedger()
        ledger.track(data)
        self.metrics.inc("out")
        if tag is None and self.phrase is not None and (data[0] & 0xF0) == 0x90 and len(data) == 3 and data[2] > 0:
            self.phrase.feed_output(music_t, data)

    def _emit_scheduled(self, due: float, data: bytes, tag: object) -> None:
        if isinstance(tag, LookaheadNote):
            value = self.lookahead.resolve(tag)
            if value is None:
                self.metrics.inc("deadline_miss")
            data = bytes((data[0], data[1], self.velocity.combine(data[2], value)))
            tag = None
        elif isinstance(tag, VaryTag):
            data = self.vary.on_scheduled(data, tag)
            if data is None:
                return
        elif tag is not None and self.phrase is not None:
            data = self.phrase.on_scheduled(data, tag)
            if data is None:
                return
        self._emit(due, data, tag)

    def panic(self, reason: str, source: int | None = None) -> None:
        """Release every sounding note (matching note-offs, then CC 123) and cancel responses;
        with ``source``, only what that source's notes left sounding."""
        if self.phrase is not None and source in (None, 0):
            self.phrase.cancel_response(release=False)
        if self.vary is not None and source in (None, 0):
            self.vary.reset()
        released = 0
        for src, ledger in list(self._ledgers.items()):
            if source is not None and src != source:
                continue
            owed = ledger.release_all()
            released += sum(1 for d in owed if d[0] & 0xF0 == 0x80)
            for data in owed:
                self.sinks.send(src, data, self.now_music(), "panic")
        if released:
            log.info("panic (%s): releasing %d", reason, released)
        self.metrics.inc("panics")

    def forget_source(self, source: int, reason: str) -> None:
        """A source went away (a remote session said goodbye or timed out): release what its
        notes left sounding and drop its per-channel state, model state included."""
        self.panic(reason, source=source)
        if source != 0:
            self._ledgers.pop(source, None)
        for key in [k for k in self._rolls if k[0] == source]:
            del self._rolls[key]
            self.velocity.forget(key)

    def melody(self, source: int, channel: int, bars: int) -> np.ndarray:
        """The last ``bars`` of a channel as melody events (``PianoRollWindow.melody_steps``), on
        the sixteenth grid of the MIDI clock while it runs, else ending now at ``engine.bpm``."""
        end, step_s = self.clock.sixteenths(self.now_music(), bpm=self.settings.engine.bpm)
        return self._roll(source, channel).melody_steps(end, bars * self.settings.engine.beats_per_bar * 4, step_s)

    def melody_at(self, session: tuple[int, int], end_t: float, steps: int, seconds_per_step: float) -> np.ndarray:
        """``steps`` sixteenths of a channel ending at ``end_t``, as melody events (silence if it
        has played nothing yet)."""
        roll = self._rolls.get(session)
        return np.zeros(steps, np.int16) if roll is None else roll.melody_steps(end_t, steps, seconds_per_step)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "engine used before bind()"
        return self._loop

    @property
    def backlog(self) -> int:
        """Input messages queued for the pump."""
        return len(self._queue)

    def now_music(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    # ---- background tasks -------------------------------------------------------------------

    async def run(self, *extra_tasks: Callable[[], Any]) -> None:
        """Run until :meth:`stop`; on the way out release every note and stop the workers."""
        if self._loop is None:
            self.bind(asyncio.get_running_loop())
        # The loop, the input poller and the model workers are threads of one process. CPython
        # lets a busy thread keep the GIL for 5 ms before handing it over — longer than a note's
        # deadline — so ask for handovers every 0.25 ms while the engine runs.
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(min(old_switch, 0.00025))
        # Everything loaded so far (torch, the models, the settings) lives as long as the
        # process: move it out of the cyclic collector's reach, so that a full collection while
        # notes are playing walks only what the engine allocated since (milliseconds less).
        gc.collect()
        gc.freeze()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._pump(), name="pump"),
                    tg.create_task(background.stats(self), name="stats"),
                    tg.create_task(background.loop_lag(self), name="loop-lag"),
                    tg.create_task(background.watchdog(self), name="watchdog"),
                    tg.create_task(background.keep_warm(self), name="keep-warm"),
                ]
                if self.phrase is not None:  # timers drive it; the task ties its lifetime to the engine's
                    tasks.append(tg.create_task(self.phrase.run(), name="phrase"))
                for make in extra_tasks:
                    tasks.append(tg.create_task(make(), name=getattr(make, "__name__", "extra")))
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            sys.setswitchinterval(old_switch)
            self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued input message has been processed."""
        await asyncio.sleep(0)
        await asyncio.wait_for(self._idle.wait(), timeout)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self.panic("shutdown")
        stages = background.model_stages(self)
        if self.vary is not None:
            self.vary.close()
        if self.phrase is not None:
            self.phrase.close()
        for stage in stages:
            stage.stop()
            stage.publish(self.metrics)

    # ---- performer controls -----------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        if mode != self.velocity.mode:
            self.panic(f"mode switch to {mode}")
            self.velocity.mode = mode
