import math

import numpy as np
import pytest

from cadenza.buffers.clock import MidiClock
from cadenza.buffers.history import EventHistory
from cadenza.buffers.ledger import NoteLedger
from cadenza.buffers.pianoroll import PianoRollWindow


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


def test_history_ring_keeps_the_last_events_in_order():
    h = EventHistory(capacity=8)
    for i in range(20):
        h.append(float(i), bytes((0x90, i, 64)))
    t, status, d1, _ = h.last(5)
    assert list(t) == [15, 16, 17, 18, 19] and list(d1) == [15, 16, 17, 18, 19]
    assert len(h) == 8 and h.total == 20


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


def test_clock_tempo_position_and_grid():
    clock = MidiClock()
    clock.handle(0.0, b"\xfa")
    t = 0.0
    for _ in range(24 * 5):
        t += 0.5 / 24  # 120 bpm
        clock.handle(t, b"\xf8")
    assert clock.bpm == pytest.approx(120, rel=1e-6)
    assert clock.beat == pytest.approx(5.0) and clock.bar_phase == pytest.approx(0.25)
    assert clock.next_grid_time(t + 0.1, unit_beats=4) == pytest.approx(t + 1.5)  # next bar line
    clock.handle(t, bytes((0xF2, 16, 0)))  # song position: 16 sixteenths = bar 2
    assert clock.beat == pytest.approx(4.0)
    clock.handle(t, b"\xfc")
    assert not clock.running and clock.next_grid_time(7.0, unit_beats=4) == 7.0


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
