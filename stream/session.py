"""A session: one source's performer state, kept apart from every other source's.

The engine serves several sources at once: source 0 is the local MIDI ports, sources 1, 2, ...
are remote sessions (the MQTT daemon's). What a performer does to the engine -- a panic, a mode
switch, the strength knob, a phrase to answer, a loop to vary, the tempo of its MIDI clock --
belongs to that performer alone, so each source gets a :class:`Session`, made at its first message
(source 0's at once) and dropped by ``Engine.forget_source``.

A session owns the state; the models stay shared. Its velocity controls sit over the one velocity
worker, its call and response over the one phrase model (a KV cache per session in the model's
thread), its vary loop over the one MusicVAE: one thread and one copy of the weights per model,
however many sessions. The model runtime keys its per-channel state by ``SessionKey = (source,
channel)``; a session is all the channels of one source.

Settings are the defaults a session starts from; performer controls change only the session that
sent them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cadenza.buffers.clock import MidiClock
from cadenza.buffers.ledger import NoteLedger
from cadenza.buffers.pianoroll import PianoRollWindow
from cadenza.stream.velocity_stage import VelocityStage

if TYPE_CHECKING:
    from cadenza.stream.engine import Engine
    from cadenza.stream.phrase import CallResponse
    from cadenza.stream.vary import VaryLoop


class Session:
    """One source: its note ledger, MIDI clock, velocity controls, piano-roll windows (one per
    channel that plays notes), and, in the modes that have them, its call and response and its
    vary loop."""

    def __init__(self, engine: Engine, source: int) -> None:
        settings = engine.settings
        self.source = source
        self.ledger = NoteLedger()  # what this source's output left sounding
        self.clock = MidiClock(beats_per_bar=settings.engine.beats_per_bar)
        self.velocity = VelocityStage(settings.velocity, engine.velocity_worker)
        self._frame_s = settings.engine.frame_ms / 1000
        self._window_s = settings.engine.window_s
        self._bpm = settings.engine.bpm
        self.rolls: dict[int, PianoRollWindow] = {}  # per channel
        self.phrase: CallResponse | None = engine.phrase_stage.session(self) if engine.phrase_stage is not None else None
        self.vary: VaryLoop | None = engine.vary_stage.session(self) if engine.vary_stage is not None else None

    def roll(self, channel: int) -> PianoRollWindow:
        """The channel's window, made at its first note (channels that only send controllers have none)."""
        roll = self.rolls.get(channel)
        if roll is None:
            roll = self.rolls[channel] = PianoRollWindow(frame_s=self._frame_s, window_s=self._window_s)
        return roll

    def melody(self, channel: int, now: float, bars: int) -> np.ndarray:
        """The last ``bars`` of a channel as melody events (``PianoRollWindow.melody_steps``), on
        the sixteenth grid of this source's MIDI clock while it runs, else ending ``now`` at ``engine.bpm``."""
        end, step_s = self.clock.sixteenths(now, bpm=self._bpm)
        return self.roll(channel).melody_steps(end, bars * self.clock.beats_per_bar * 4, step_s)

    def melody_at(self, channel: int, end_t: float, steps: int, seconds_per_step: float) -> np.ndarray:
        """``steps`` sixteenths of a channel ending at ``end_t``, as melody events (silence if it
        has played nothing yet)."""
        roll = self.rolls.get(channel)
        return np.zeros(steps, np.int16) if roll is None else roll.melody_steps(end_t, steps, seconds_per_step)

    def stop_playing(self) -> None:
        """Panic, mode switch, goodbye: the answers in flight stop (the ledger releases their notes)."""
        if self.phrase is not None:
            self.phrase.cancel_response(release=False)
        if self.vary is not None:
            self.vary.reset()

    def close(self) -> None:
        """The session has ended: its timers stop (after :meth:`stop_playing` and the ledger's release)."""
        if self.phrase is not None:
            self.phrase.close()
        if self.vary is not None:
            self.vary.close()
