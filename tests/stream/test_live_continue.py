"""Call and response through real JACK ports, with the shipped phrase model."""

from __future__ import annotations

import time

import pytest

from cadenza.messages import control

from .conftest import Listener, Player, pedal_down, running_service, sounding

pytestmark = pytest.mark.jack

STATE_CC = 27  # controls.state_out_cc default


def _phrase(player: Player, notes=(60, 62, 64, 65, 67, 65, 64, 62, 60, 64, 67, 72), dur=0.08) -> None:
    for p in notes:
        player.send((0x90, p, 80))
        time.sleep(dur)
        player.send((0x80, p, 0))
        time.sleep(0.02)


@pytest.fixture()
def continue_service(jack_server):
    answer = {"silence_ms": 400, "length_mode": "seconds", "response_seconds": 3.0, "seed": 1, "temperature": 1.0}
    with running_service("continue", phrase=answer) as parts:
        yield parts


def _response_note_ons(listener: Listener, after: float) -> list[tuple[float, bytes]]:
    return [(t, m) for t, m in listener.got if t > after and m[0] & 0xF0 == 0x90 and m[2] > 0]


def test_phrase_in_answer_out_without_stuck_notes(continue_service):
    svc, player, listener = continue_service
    _phrase(player)
    t_end = time.monotonic()
    # The answer starts after the silence (0.4 s) plus the time to its first note.
    assert listener.wait_for(lambda ms: _response_note_ons(listener, t_end), 5.0), "no answer"
    first = _response_note_ons(listener, t_end)[0][0]
    assert first - t_end < 0.4 + 0.6
    # The state CC reports responding (127), then idle again (0) once the answer has played.
    assert listener.wait_for(lambda ms: (0xB0, STATE_CC, 0) in [tuple(m) for m in ms[-3:]], 10.0)
    assert (0xB0, STATE_CC, 127) in [tuple(m) for m in listener.messages()]
    snap = svc.stop()
    assert snap["latency"]["ttfn"]["n"] == 1
    assert sounding(listener.messages()) == {} and pedal_down(listener.messages()) == set()


def test_barge_in_stops_the_answer_and_releases_its_notes(continue_service):
    svc, player, listener = continue_service
    _phrase(player, notes=(48, 52, 55, 60, 55, 52, 48, 43))
    t_end = time.monotonic()
    assert listener.wait_for(lambda ms: _response_note_ons(listener, t_end), 5.0)
    time.sleep(0.3)
    # The answer presses the sustain pedal (an event of the answer, played by the scheduler like
    # the model's own): a cut-short answer must lift it, or everything after it rings on.
    eng = svc.engine
    svc.call(lambda: eng.scheduler.schedule(eng.now_music(), control(0, 64, 127), eng.phrase._gen))
    assert listener.wait_for(lambda ms: control(0, 64, 127) in ms, 2.0)
    assert pedal_down(listener.messages()) == {0}
    t_barge = time.monotonic()
    player.send((0x90, 72, 90))  # the performer plays again: the answer yields
    time.sleep(0.5)
    assert svc.call(lambda: svc.engine.metrics.counters["barge_in"]) == 1
    # After the barge-in only the performer's own note may sound.
    after = [m for t, m in listener.got if t > t_barge + 0.05]
    assert not [m for m in after if m[0] & 0xF0 == 0x90 and m[2] > 0 and m[1] != 72]
    assert set(sounding(listener.messages())) == {(0, 72)}
    assert pedal_down(listener.messages()) == set()
    player.send((0x80, 72, 0))
    time.sleep(0.1)
    svc.stop()
    assert sounding(listener.messages()) == {}


def test_with_midi_clock_the_phrase_ends_on_the_next_bar_line_and_the_answer_starts_there(continue_service):
    import threading

    svc, player, listener = continue_service
    clock_out = Player("cadenza in", name="clock")  # its own client: rtmidi outputs are single-producer
    stop = threading.Event()
    spt = 0.5 / 24  # 120 bpm: a bar of 4/4 is 2 s
    t_start = time.monotonic() + 0.05

    def clock():
        clock_out.send((0xFA,))
        k = 0
        while not stop.is_set():  # the first tick after Start is the downbeat, at t_start
            time.sleep(max(0.0, t_start + k * spt - time.monotonic()))
            clock_out.send((0xF8,))
            k += 1

    th = threading.Thread(target=clock, daemon=True)
    th.start()
    try:
        # the phrase ends 0.35 s before the bar line at 2 s: sooner than the 0.4 s silence that
        # ends a phrase without clock, so waiting for silence would push the answer to 4 s
        time.sleep(max(0.0, t_start + 1.25 - time.monotonic()))
        _phrase(player, notes=(60, 64, 67, 72))
        t_end = time.monotonic()
        assert listener.wait_for(lambda ms: _response_note_ons(listener, t_end), 6.0), "no answer"
    finally:
        stop.set()
        th.join()
        clock_out.close()
    first = _response_note_ons(listener, t_end)[0][0]
    assert abs(first - t_start - 2.0) < 0.05, f"answer started at {first - t_start:.3f} s, not on the bar line at 2 s"
    svc.stop()
    assert sounding(listener.messages()) == {}


def test_end_call_cc_answers_at_once_and_duck_mode_keeps_the_answer_quieter(jack_server):
    answer = {
        "silence_ms": 5000,
        "end_cc": 85,
        "barge_in": "duck",
        "duck_factor": 0.25,
        "length_mode": "seconds",
        "response_seconds": 3.0,
        "seed": 3,
        "temperature": 1.0,
    }
    with running_service("continue", phrase=answer) as (svc, player, listener):
        _phrase(player)
        t_end = time.monotonic()
        player.send((0xB0, 85, 127))  # end of call: no 5 s silence needed
        assert listener.wait_for(lambda ms: _response_note_ons(listener, t_end), 2.0), "no answer after the end-call CC"
        assert _response_note_ons(listener, t_end)[0][0] - t_end < 1.0
        time.sleep(0.3)
        t_duck = time.monotonic()
        player.send((0x90, 40, 90))  # the performer plays: the answer ducks instead of stopping
        time.sleep(1.0)
        after = [m for t, m in _response_note_ons(listener, t_duck + 0.05) if m[1] != 40]
        assert svc.call(lambda: svc.engine.metrics.counters["barge_in"]) >= 1
        assert after, "duck mode stopped the answer"
        assert max(m[2] for m in after) <= int(127 * 0.25), after  # every answer note after the barge-in, ducked
        player.send((0x80, 40, 0))
        svc.stop()
    assert sounding(listener.messages()) == {} and pedal_down(listener.messages()) == set()
