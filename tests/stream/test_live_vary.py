"""``serve --mode vary`` through real JACK ports, with MIDI clock and the shipped 2-bar MusicVAE."""

from __future__ import annotations

import threading
import time

import pytest

from cadenza.messages import control, note_off, note_on

from .conftest import Player, running_service, sounding

pytestmark = pytest.mark.jack

OUT_CH = 1  # vary.out_channel default: the variation plays on channel 2
BEAT = 0.5  # 120 bpm: a sixteenth is 125 ms, a 2-bar loop 4 s
LOOP_S = 8 * BEAT
LOOP = (60, 62, 64, 65, 67, 65, 64, 62)  # eighth notes: one bar, played twice per loop


class Clock:
    """24 pulses a beat from its own JACK client (rtmidi outputs are single-producer)."""

    def __init__(self, t0: float) -> None:
        self.out = Player("cadenza in", name="clock")
        self.t0 = t0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.out.send((0xFA,))
        k = 0
        while not self.stop.is_set():  # the first tick after Start is the downbeat, at t0
            time.sleep(max(0.0, self.t0 + k * BEAT / 24 - time.monotonic()))
            self.out.send((0xF8,))
            k += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.out.close()


def _play_loop(player: Player, t0: float, bars: int) -> None:
    """Eighth notes from ``t0`` (a bar line) for ``bars`` bars."""
    for i in range(bars * 8):
        pitch = LOOP[i % len(LOOP)]
        time.sleep(max(0.0, t0 + i * BEAT / 2 - time.monotonic()))
        player.send(note_on(0, pitch, 80))
        time.sleep(BEAT / 3)
        player.send(note_off(0, pitch))


def _variation(listener, after: float = 0.0) -> list[tuple[float, bytes]]:
    return [(t, m) for t, m in listener.got if t >= after and m[0] == 0x90 | OUT_CH and m[2] > 0]


def test_a_played_loop_comes_back_varied_from_the_next_loop_line_and_nothing_hangs(jack_server):
    with running_service("vary", controls={"state_out_cc": None}) as (svc, player, listener):
        t_clock = time.monotonic() + 0.2
        clock = Clock(t_clock)
        t0 = t_clock + LOOP_S  # the clock runs a loop's length (bars 1-2) before the performer plays bars 3-4
        try:
            _play_loop(player, t0 + 0.01, bars=2)
            assert listener.wait_for(lambda ms: _variation(listener), LOOP_S + 1.5), "no variation"
            first = _variation(listener)[0][0]
            # Its first note is in the loop after the one played (from the loop line; it may start
            # with a rest, and a late model skips what is past), on a sixteenth of the clock's
            # grid: within a quarter of a sixteenth (31 ms), room for the clock thread's and
            # JACK's jitter on a loaded machine.
            offset = first - t0 - LOOP_S
            assert -0.03 < offset < LOOP_S, f"variation started {offset:+.3f} s from the loop line"
            sixteenths = offset / (BEAT / 4)
            assert abs(sixteenths - round(sixteenths)) < 0.25, f"variation {sixteenths:.2f} sixteenths from the loop line: off the grid"
            # the performer keeps the clock and plays on: every note of the variation is released
            time.sleep(0.5)
            player.send(control(0, 23, 127))  # panic CC: nothing of the variation keeps sounding
            time.sleep(0.2)
            assert not {k for k in sounding(listener.messages()) if k[0] == OUT_CH}
        finally:
            clock.close()
        svc.stop()
    assert sounding(listener.messages()) == {}


def test_vary_stops_releasing_its_notes_when_the_service_stops_mid_loop(jack_server):
    with running_service("vary", engine={"bpm": 120.0}, controls={"state_out_cc": None}) as (svc, player, listener):
        t0 = time.monotonic() + 0.2
        _play_loop(player, t0, bars=3)  # no clock: the grid starts on the first note, at engine.bpm
        assert listener.wait_for(lambda ms: _variation(listener), 3.0), "no variation without a clock"
        counters = svc.stop()["counters"]
    assert counters.get("vae_requests", 0) >= 1
    assert sounding(listener.messages()) == {}
