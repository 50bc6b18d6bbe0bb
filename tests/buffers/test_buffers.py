import math

import numpy as np
import pytest

from cadenza.buffers.clock import MidiClock
from cadenza.buffers.ledger import NoteLedger
from cadenza.buffers.pianoroll import MIN_PITCH, NOTE_OFF, PianoRollWindow, melody_event


def test_ledger_releases_exactly_what_sounds():
    led = NoteLedger()
    for d in (b"\x90\x3c\x40", b"\x90\x3c\x50", b"\x91\x40\x40", b"\x90\x3e\x40", b"\x80\x3e\x00", b"\x92\x30\x00"):
        led.track(d)
    assert led.sounding == 3  # 60 struck twice, 64 on channel 2; 62 released; a zero-velocity note-on is an off
    out = led.release_all()
    assert out.count(b"\x80\x3c\x00") == 2 and b"\x81\x40\x00" in out
    assert out[-2:] == [b"\xb0\x7b\x00", b"\xb1\x7b\x00"]  # then All Notes Off on the channels used
    assert led.sounding == 0 and led.release_all() == []


def test_ledger_lifts_a_pedal_left_down():
    led = NoteLedger()
    for d in (b"\xb1\x40\x7f", b"\x91\x3c\x40", b"\x81\x3c\x00", b"\xb2\x40\x7f", b"\xb2\x40\x00"):
        led.track(d)
    # the note is released but rings on under channel 1's pedal; channel 2's pedal is up already
    assert led.release_all() == [b"\xb1\x40\x00", b"\xb1\x7b\x00", b"\xb2\x7b\x00"]
    assert led.release_all() == []


def test_pianoroll_window_scrolls_and_carries_held_keys():
    roll = PianoRollWindow(frame_s=0.01, window_s=0.1)
    roll.note_on(0.005, 60, 90)
    roll.note_on(0.031, 64, 70)
    roll.note_off(0.052, 64)
    roll.advance_to(0.095)
    onset, down = roll.ordered()
    assert onset.shape == (10, 128)
    assert onset[0, 60] == 90 and onset[3, 64] == 70
    assert down[:, 60].all()  # held the whole window
    assert down[3:5, 64].all() and not down[6:, 64].any()
    roll.advance_to(0.5)  # everything scrolled out but the held key
    onset, down = roll.ordered()
    assert onset.sum() == 0 and down[:, 60].all() and not down[:, 64].any()


class _FrameByFrame:
    """The window's meaning, one frame at a time (the reference the ring must match)."""

    def __init__(self, frame_s: float, n: int) -> None:
        self.frame_s, self.frames, self.held = frame_s, {}, np.zeros(128, bool)
        self.n, self.newest = n, None

    def advance_to(self, t: float) -> None:
        f = int(t // self.frame_s)
        if self.newest is None:
            self.newest = f - 1
        for k in range(self.newest + 1, f + 1):
            self.frames[k] = (np.zeros(128, np.uint8), self.held.copy())
        self.newest = max(self.newest, f)

    def event(self, t: float, pitch: int, velocity: int) -> None:
        self.advance_to(t)
        onset, down = self.frames[self.newest]
        if velocity:
            onset[pitch] = max(onset[pitch], velocity)
            down[pitch] = True
        self.held[pitch] = velocity > 0

    def ordered(self):
        keys = range(self.newest - self.n + 1, self.newest + 1)
        empty = (np.zeros(128, np.uint8), np.zeros(128, bool))
        return np.stack([self.frames.get(k, empty)[0] for k in keys]), np.stack([self.frames.get(k, empty)[1] for k in keys])


def test_pianoroll_ring_matches_frame_by_frame_through_gaps_and_wraps():
    rng = np.random.default_rng(3)
    roll, ref = PianoRollWindow(frame_s=0.01, window_s=0.37), _FrameByFrame(0.01, 37)
    t = 0.0
    for _ in range(400):
        t += float(rng.choice([0.0, 0.004, 0.03, 0.2, 0.36, 0.37, 0.5, 3.0]))  # inside a frame, a wrap, past the window
        pitch, vel = int(rng.integers(50, 60)), int(rng.choice([0, 40, 100]))
        (roll.note_on(t, pitch, vel) if vel else roll.note_off(t, pitch))
        ref.event(t, pitch, vel)
        onset, down = roll.ordered()
        r_onset, r_down = ref.ordered()
        assert (onset == r_onset).all() and (down == r_down).all()


def test_melody_steps_reads_the_top_voice_on_a_sixteenth_grid():
    roll = PianoRollWindow(frame_s=0.01, window_s=4.0)
    roll.note_on(0.001, 60, 80)
    roll.note_off(0.3, 60)
    roll.note_on(0.5, 48, 80)  # a chord: the melody is its top note
    roll.note_on(0.505, 64, 80)
    roll.note_off(0.7, 64)
    roll.note_off(0.95, 48)
    steps = roll.melody_steps(1.0, 8, 0.125)  # a bar of 8 sixteenths at 120 bpm, ending at 1 s
    assert steps.tolist() == [melody_event(60), 0, NOTE_OFF, 0, melody_event(64), NOTE_OFF, 0, 0]
    assert melody_event(60) == 60 - MIN_PITCH + 2
    with pytest.raises(ValueError, match="window"):
        roll.melody_steps(1.0, 64, 0.125)  # 8 s do not fit a 4 s window


def test_melody_event_folds_pitches_into_the_range_by_octaves():
    assert melody_event(21) == 2 and melody_event(108) == 89
    assert melody_event(9) == melody_event(21) and melody_event(120) == melody_event(108)


def test_clock_tempo_position_and_grid():
    clock = MidiClock()
    clock.handle(0.0, b"\xfa")
    clock.handle(0.0, b"\xf8")  # the first tick after Start is the downbeat
    assert clock.beat == 0.0
    t = 0.0
    for _ in range(24 * 5):
        t += 0.5 / 24  # 120 bpm
        clock.handle(t, b"\xf8")
    assert clock.bpm == pytest.approx(120, rel=1e-6)
    assert clock.beat == pytest.approx(5.0) and clock.bar_phase == pytest.approx(0.25)
    assert clock.next_grid_time(t + 0.1, unit_beats=4) == pytest.approx(t + 1.5)  # next bar line
    assert clock.last_grid_time(t + 0.2, unit_beats=0.25) == pytest.approx(t + 0.125)  # last sixteenth line
    assert clock.sixteenths(t + 0.2, bpm=90) == pytest.approx((t + 0.125, 0.125))  # the clock's grid, not the set tempo
    clock.handle(t, b"\xfc")
    clock.handle(t, bytes((0xF2, 16, 0)))  # song position: 16 sixteenths = bar 2
    assert clock.beat == pytest.approx(4.0)
    clock.handle(t, b"\xfb")
    clock.handle(t + 0.5 / 24, b"\xf8")  # continue: the next tick plays the position set
    assert clock.beat == pytest.approx(4.0)
    clock.handle(t + 1.0 / 24, b"\xf8")
    assert clock.beat == pytest.approx(4.0 + 1 / 24)
    assert clock.time_at_beat(5.0) == pytest.approx(t + 1.0 / 24 + 23 * 0.5 / 24)
    assert clock.beat_at(t + 1.0 / 24 + 0.25) == pytest.approx(4.5 + 1 / 24)
    clock.handle(t, b"\xfc")
    assert not clock.running and clock.next_grid_time(7.0, unit_beats=4) == 7.0
    assert clock.last_grid_time(7.0, unit_beats=0.25) is None
    assert clock.sixteenths(7.0, bpm=90) == pytest.approx((7.0, 60 / 90 / 4))  # stopped: free time at the set tempo


def test_clock_tempo_survives_period_quantised_jittery_ticks():
    """Live ticks are stamped when a JACK period (1.33 ms) delivers them, sometimes a period
    late: the tempo must read true, not as whatever the quantised intervals' median is."""
    rng = np.random.default_rng(3)
    period = 64 / 48000
    tick = 15.7 * period  # 20.9 ms: 119.6 bpm, between two whole numbers of periods
    clock = MidiClock()
    clock.handle(0.0, b"\xfa")
    for k in range(200):
        stamped = math.ceil((1.0 + k * tick) / period) * period + period * rng.choice([0, 0, 0, 1])
        clock.handle(stamped, b"\xf8")
    assert clock.bpm == pytest.approx(60.0 / (24 * tick), rel=0.01)
