"""The engine: one asyncio loop that moves MIDI from sources, through the stages, to sinks.

Sources call :meth:`Engine.deliver` from any thread with ``(arrival time, bytes)``; that is one
``call_soon_threadsafe``. On the loop, the input queue is bounded: when full, note-ons (and other
droppable kinds) are dropped and counted; note-offs, controllers (pedal) and clock never are.

The pump drains what is queued, asks the velocity worker for every note-on in one go, waits at
most until the earliest note's deadline, and emits everything in input order — a controller that
followed a note-on never overtakes it. Every outgoing message passes the open-note ledger of its
source, so ``panic()`` can always release exactly what is sounding.

Each source (0: the local ports; 1, 2, ...: remote sessions) has its own
:class:`~cadenza.stream.session.Session`: ledger, MIDI clock, velocity controls, call and response,
vary loop. A performer control acts on the session that sent it, and every answer goes out as the
source it answers (a routed sink sends it back there). The models are shared by all sessions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from cadenza.config.settings import Settings
from cadenza.messages import NEVER_DROP, Kind, classify
from cadenza.models.velocity.worker import VelocityWorker
from cadenza.stream import tasks as background
from cadenza.stream.controls import control_map
from cadenza.stream.lookahead import Delayed
from cadenza.stream.metrics import Metrics
from cadenza.stream.phrase import AnswerTag
from cadenza.stream.scheduler import OutputScheduler
from cadenza.stream.session import Session
from cadenza.stream.sinks import AnySink, Sinks
from cadenza.stream.vary import VaryTag
from cadenza.stream.velocity_stage import is_down

if TYPE_CHECKING:
    from cadenza.buffers.clock import MidiClock
    from cadenza.buffers.ledger import NoteLedger
    from cadenza.models.velocity.worker import VelocityWorker
    from cadenza.stream.lookahead import LookaheadStage
    from cadenza.stream.phrase import CallResponse, PhraseStage
    from cadenza.stream.vary import VaryLoop, VaryStage
    from cadenza.stream.velocity_stage import VelocityStage

log = logging.getLogger(__name__)


class Engine:
    """Assembled by :func:`cadenza.stream.build.build_engine`, which starts and stops its stages.

    ``velocity_worker`` colorizes note-ons, ``lookahead`` delays everything by a fixed time for
    the full-context model, ``phrase_factory(engine)`` makes the phrase stage (it needs the
    engine to emit its answers); each is None when the mode does not use it.

    ``sessions`` holds each source's :class:`Session` (``session(source)`` makes one);
    ``ledger``, ``clock``, ``velocity``, ``phrase`` and ``vary`` are source 0's (the ports').
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
        self.velocity_worker = velocity_worker
        self.deadline_s = settings.velocity.deadline_ms / 1000.0
        self.realtime = realtime
        self.lookahead = lookahead
        self._queue: deque = deque()
        self._queued: Counter[int] = Counter()  # messages waiting per source (engine.source_queue)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scheduler: OutputScheduler | None = None
        self._control_map = control_map(settings)
        self._idle = asyncio.Event()
        self.last_pump = 0.0  # when the pump last took a batch (monotonic)
        self._idle.set()
        self.phrase_stage: PhraseStage | None = phrase_factory(self) if phrase_factory is not None else None
        self.vary_stage: VaryStage | None = vary_factory(self) if vary_factory is not None else None
        self.sessions: dict[int, Session] = {}
        self.session(0)  # the ports' performer is there from the start

    def session(self, source: int) -> Session:
        """The source's session, made at its first message (settings are its defaults)."""
        s = self.sessions.get(source)
        if s is None:
            s = self.sessions[source] = Session(self, source)
            if s.phrase is not None:
                s.phrase.announce()
        return s

    # Source 0 (the local ports) as the engine had it before sessions: what serve, the demo and
    # the benches drive.
    @property
    def ledger(self) -> NoteLedger:
        return self.sessions[0].ledger

    @property
    def clock(self) -> MidiClock:
        return self.sessions[0].clock

    @property
    def velocity(self) -> VelocityStage:
        return self.sessions[0].velocity

    @property
    def phrase(self) -> CallResponse | None:
        return self.sessions[0].phrase

    @property
    def vary(self) -> VaryLoop | None:
        return self.sessions[0].vary

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
        if kind not in NEVER_DROP:
            if len(self._queue) >= self.settings.engine.input_queue:
                self.metrics.inc("dropped")
                self.metrics.inc("dropped_queue_full")
                return
            if self._queued[source] >= self.settings.engine.source_queue:
                self.metrics.inc("dropped")
                self.metrics.inc("dropped_source_share")  # its share is full; the others' is not
                return
        self._queued[source] += 1
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
                item = self._queue.popleft()
                self._queued[item[3]] -= 1
                batch.append(item)
            self.metrics.gauge("queue_depth", len(self._queue))
            out: list[list] = []  # [data, future|None, player_velocity, t_arrival, music_t, source, VelocityStage]
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
                self.velocity.flush()  # the shared worker: an inline one answers here; a thread is already at it
                self.metrics.observe("velocity", time.monotonic() - t_pump)  # features + model (inline) or submit
            waiting = [fut for _, fut in asked if not fut.done()]
            earliest = min((t for t, fut in asked if not fut.done()), default=None)
            if waiting:
                t_submit = loop.time()
                timeout = max(0.0, earliest + self.deadline_s - t_submit)
                await asyncio.wait(waiting, timeout=timeout)
                self.metrics.observe("model", loop.time() - t_submit)
            for data, fut, player_vel, t, music_t, source, velocity in out:
                if fut is not None:
                    value = None
                    if not is_down(fut) and fut.done() and not fut.cancelled():
                        value = fut.result()
                    if value is None or time.monotonic() - t > self.deadline_s:
                        # no answer in time (or an inline answer that took longer than the deadline)
                        self.metrics.inc("deadline_miss")
                    data = bytes((data[0], data[1], velocity.combine(player_vel, value)))
                self._emit(music_t, data, None, source)
                self.metrics.observe("internal", time.monotonic() - t)

    def _process(self, t: float, data: bytes, kind: Kind, source: int, music_t: float) -> list | None:
        """Update state for one input message; return its output entry, or None if consumed."""
        s = self.sessions.get(source) or self.session(source)
        if kind is Kind.CLOCK or kind is Kind.TRANSPORT or (kind is Kind.COMMON and data[0] == 0xF2):
            s.clock.handle(music_t, data)
            return [data, None, 0, t, music_t, source, None]
        if kind > Kind.PITCH_BEND:
            return [data, None, 0, t, music_t, source, None]
        ch = data[0] & 0x0F
        key = (source, ch)
        if self.lookahead is not None and not self._is_control(data, kind, ch):
            self._delay(t, data, kind, key, music_t)
            return None
        cr = s.phrase
        if kind is Kind.NOTE_ON:
            self.metrics.inc("note_on")
            s.roll(ch).note_on(music_t, data[1], data[2])
            if cr is not None:
                cr.performer_note_on(music_t, data)
            if s.vary is not None:
                s.vary.performer_note_on(music_t, ch)
            fut = s.velocity.request(key, music_t, data[1], data[2])
            return [data, fut, data[2], t, music_t, source, s.velocity]
        if kind is Kind.NOTE_OFF:
            s.roll(ch).note_off(music_t, data[1])
            s.velocity.note_off(key, music_t, data[1])
            if cr is not None:
                cr.performer_event(music_t, data, note_off=True)
            return [data, None, 0, t, music_t, source, None]
        if kind is Kind.CONTROL:
            handler = self._control_map.get(data[1])
            ctl_ch = self.settings.controls.channel
            if handler is not None and (ctl_ch is None or ctl_ch == ch):
                handler(self, s, data[2])  # the sender's session only
                if self.settings.controls.consume:
                    self.metrics.inc("consumed")
                    return None
            if data[1] == 64:
                s.velocity.pedal(key, music_t, data[2])
                if cr is not None:
                    cr.performer_event(music_t, data)
            elif cr is not None and cr.is_end_cc(data):
                cr.end_call(music_t)
        return [data, None, 0, t, music_t, source, None]

    def _is_control(self, data: bytes, kind: Kind, ch: int) -> bool:
        ctl_ch = self.settings.controls.channel
        return kind is Kind.CONTROL and data[1] in self._control_map and (ctl_ch is None or ctl_ch == ch)

    def _delay(self, t: float, data: bytes, kind: Kind, session, music_t: float) -> None:
        """Lookahead mode: everything leaves exactly S after it came in; note-ons get the
        full-context model's velocity when they are due."""
        la = self.lookahead
        tag = Delayed(session[0])
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
        s = self.sessions.get(source) or self.session(source)
        s.ledger.track(data)
        self.metrics.inc("out")
        if tag is None and s.phrase is not None and (data[0] & 0xF0) == 0x90 and len(data) == 3 and data[2] > 0:
            s.phrase.feed_output(music_t, data)

    def _emit_scheduled(self, due: float, data: bytes, tag: object) -> None:
        """A scheduled event is due: it goes out as the source it answers (or was delayed for);
        a session that has ended meanwhile gets nothing more."""
        source = 0
        if isinstance(tag, Delayed):
            s = self.sessions.get(tag.source)
            value = self.lookahead.resolve(tag) if tag.note is not None else None
            if s is None:
                return
            if tag.note is not None:
                if value is None:
                    self.metrics.inc("deadline_miss")
                data = bytes((data[0], data[1], s.velocity.combine(data[2], value)))
            source, tag = tag.source, None
        elif isinstance(tag, VaryTag):
            s = self.sessions.get(tag.source)
            if s is None or s.vary is None or (data := s.vary.on_scheduled(data, tag)) is None:
                return
            source = tag.source
        elif isinstance(tag, AnswerTag):
            s = self.sessions.get(tag.source)
            if s is None or s.phrase is None or (data := s.phrase.on_scheduled(data, tag)) is None:
                return
            source = tag.source
        self._emit(due, data, tag, source)

    def panic(self, reason: str, source: int | None = None) -> None:
        """Release every sounding note (matching note-offs, then CC 123) and cancel responses;
        with ``source``, only that session's: what its notes and answers left sounding."""
        released = 0
        for src, s in list(self.sessions.items()):
            if source is not None and src != source:
                continue
            s.stop_playing()
            owed = s.ledger.release_all()
            released += sum(1 for d in owed if d[0] & 0xF0 == 0x80)
            for data in owed:
                self.sinks.send(src, data, self.now_music(), "panic")
        if released:
            log.info("panic (%s): releasing %d", reason, released)
        self.metrics.inc("panics")

    def forget_source(self, source: int, reason: str) -> None:
        """A source went away (a remote session said goodbye or timed out): release what its
        notes and answers left sounding and drop its session, model state included. Source 0
        (the ports) starts afresh."""
        self.panic(reason, source=source)
        s = self.sessions.pop(source, None)
        if s is not None:
            s.close()
            s.velocity.forget_all(source, s.rolls)
        if self.lookahead is not None:
            self.lookahead.forget_source(source)
        if self.phrase_stage is not None:
            self.phrase_stage.forget(source)
        if self.vary_stage is not None:
            self.vary_stage.forget(source)
        if source == 0:
            self.session(0)

    def melody(self, source: int, channel: int, bars: int) -> np.ndarray:
        """The last ``bars`` of a channel as melody events, now (see :meth:`Session.melody`)."""
        return self.session(source).melody(channel, self.now_music(), bars)

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
                if self.phrase_stage is not None:  # timers drive it; the task ties its lifetime to the engine's
                    tasks.append(tg.create_task(self.phrase_stage.run(), name="phrase"))
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
        for s in self.sessions.values():
            s.close()
        if self.vary_stage is not None:
            self.vary_stage.close()
        if self.phrase_stage is not None:
            self.phrase_stage.close()
        for stage in stages:
            stage.stop()
            stage.publish(self.metrics)

    # ---- performer controls -----------------------------------------------------------------

    def set_mode(self, mode: str, source: int = 0) -> None:
        """The source's velocity mode; a switch releases that source's notes (only)."""
        s = self.session(source)
        if mode != s.velocity.mode:
            self.panic(f"mode switch to {mode}", source=source)
            s.velocity.mode = mode
