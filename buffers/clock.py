"""MIDI clock tracking: tempo estimate and bar position from 0xF8 ticks.

24 clock ticks make a quarter note. The tempo is estimated from the ticks of the last beat
as their mean interval: a tick stamped late lengthens one interval and shortens the next by the
same amount, so timing jitter (ticks arrive on JACK/driver period boundaries) cancels out instead
of biasing the estimate, as a median of quantised intervals does; Start/Stop/Continue and Song Position
Pointer set the transport. As the MIDI 1.0 specification has it, the first tick after Start is the
downbeat (song position 0), and the first after Continue is the position a Song Position Pointer
set (or the one after the last tick played). Every stage can ask for ``bpm``, ``beat`` and
``bar_phase``, and convert between times and beats (``beat_at``, ``time_at_beat``).
"""

from __future__ import annotations

import numpy as np

TICKS_PER_BEAT = 24
CLOCK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2


class MidiClock:
    def __init__(self, *, beats_per_bar: int = 4, window: int = TICKS_PER_BEAT) -> None:
        self.beats_per_bar = beats_per_bar
        self._intervals = np.zeros(window, np.float64)
        self._n_intervals = 0
        self._last_tick_t: float | None = None
        self.ticks = 0  # ticks since song position 0
        self._on_position = False  # the next tick plays ``ticks`` itself (after Start or a pointer)
        self.running = False
        self.last_tick_t: float | None = None

    def handle(self, t: float, data: bytes) -> bool:
        """Update from a system real-time/common message; True if it was a clock message."""
        s = data[0]
        if s == CLOCK:
            if self._last_tick_t is not None:
                dt = t - self._last_tick_t
                if 0 < dt < 1.0:  # a gap of a second means the clock was paused
                    self._intervals[self._n_intervals % len(self._intervals)] = dt
                    self._n_intervals += 1
            self._last_tick_t = t
            self.last_tick_t = t
            if self.running:
                if self._on_position:
                    self._on_position = False
                else:
                    self.ticks += 1
            return True
        if s == START:
            self.running, self.ticks, self._on_position = True, 0, True
            return True
        if s == CONTINUE:
            self.running = True
            return True
        if s == STOP:
            self.running = False
            return True
        if s == SONG_POSITION and len(data) >= 3:
            sixteenths = data[1] | (data[2] << 7)
            self.ticks = sixteenths * (TICKS_PER_BEAT // 4)
            self._on_position = True
            return True
        return False

    @property
    def present(self) -> bool:
        return self._n_intervals >= TICKS_PER_BEAT // 2

    @property
    def seconds_per_beat(self) -> float | None:
        n = min(self._n_intervals, len(self._intervals))
        if n < TICKS_PER_BEAT // 2:
            return None
        return float(self._intervals[:n].mean()) * TICKS_PER_BEAT

    @property
    def bpm(self) -> float | None:
        spb = self.seconds_per_beat
        return None if spb is None else 60.0 / spb

    @property
    def beat(self) -> float:
        """Beats since song position 0 (fractional by tick)."""
        return self.ticks / TICKS_PER_BEAT

    @property
    def bar_phase(self) -> float:
        """Position inside the bar, 0 <= phase < 1."""
        return (self.beat / self.beats_per_bar) % 1.0

    def beat_at(self, t: float) -> float | None:
        """The beat (since song position 0) at time ``t``, extrapolated from the last tick at the
        current tempo; None when no clock is running or its tempo is not known yet."""
        spb = self.seconds_per_beat
        if spb is None or self.last_tick_t is None or not self.running:
            return None
        return self.beat + (t - self.last_tick_t) / spb

    def time_at_beat(self, beat: float) -> float | None:
        """The time of ``beat``, extrapolated from the last tick: ask again close to the beat, as
        a tempo estimate's error grows with the distance (a beat's worth of jitter over 8 beats)."""
        spb = self.seconds_per_beat
        if spb is None or self.last_tick_t is None or not self.running:
            return None
        return self.last_tick_t + (beat - self.beat) * spb

    def next_grid_time(self, now: float, *, unit_beats: float) -> float:
        """The time of the next multiple of ``unit_beats`` (e.g. 1 = beat, 4 = bar) after ``now``.

        Falls back to ``now`` when no clock is running.
        """
        beat_now = self.beat_at(now)
        if beat_now is None:
            return now
        target = (np.floor(beat_now / unit_beats + 1e-9) + 1) * unit_beats
        return self.time_at_beat(float(target))  # type: ignore[return-value]

    def last_grid_time(self, now: float, *, unit_beats: float) -> float | None:
        """The time of the last multiple of ``unit_beats`` at or before ``now`` (e.g. 0.25 = a
        sixteenth); None when no clock is running."""
        beat_now = self.beat_at(now)
        if beat_now is None:
            return None
        return self.time_at_beat(float(np.floor(beat_now / unit_beats + 1e-9) * unit_beats))

    def sixteenths(self, now: float, *, bpm: float) -> tuple[float, float]:
        """(the last sixteenth line at or before ``now``, seconds per sixteenth): the clock's grid
        while it runs, else free time at ``bpm`` (the grid then ends at ``now``)."""
        line = self.last_grid_time(now, unit_beats=0.25)
        if line is None:
            return now, 15.0 / bpm
        return line, self.seconds_per_beat / 4
