"""The engine in this process, built by build_engine with the shipped models, output to sinks in
memory: deadlines and fallbacks, every performer control, what is never dropped, panic per source,
and the last bars read back as a melody. No JACK needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from cadenza.buffers.pianoroll import NOTE_OFF, melody_event
from cadenza.config.settings import load_settings
from cadenza.messages import control, note_off, note_on
from cadenza.stream.build import build_engine
from cadenza.stream.engine import Engine
from cadenza.stream.phrase import RESPONDING
from cadenza.stream.sinks import AnySink, ListSink

from .conftest import sounding

C = load_settings().controls  # the shipped CC map


def _settings(**sections):
    s = load_settings()
    s.engine.stats_interval_s = 0
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(s, section), k, v)
    return s


def drive(settings, mode: str, body: Callable[[Engine], Awaitable[None]], sinks: list[AnySink] | None = None) -> Engine:
    """Build the engine for ``mode``, run it, await ``body(engine)``, stop it; return it."""

    async def main() -> Engine:
        async with build_engine(settings, mode, sinks if sinks is not None else [ListSink()]) as engine:
            run = asyncio.create_task(engine.run())
            try:
                await body(engine)
                await engine.drain()
            finally:
                engine.stop()
                await run
            return engine

    return asyncio.run(main())


async def play(engine: Engine, *msgs: tuple[int, ...], source: int = 0) -> None:
    for m in msgs:
        engine.deliver_now(time.monotonic(), bytes(m), source=source)
        await engine.drain()


def out(engine: Engine) -> list[bytes]:
    return next(s for s in engine.sinks if isinstance(s, ListSink)).messages


def note_on_velocities(messages: list[bytes]) -> list[int]:
    return [m[2] for m in messages if m[0] & 0xF0 == 0x90 and m[2] > 0]


# ---- deadlines ---------------------------------------------------------------------------------


def test_a_missed_deadline_is_answered_by_the_fallback_and_counted():
    """A model thread that is not back by the deadline: the note leaves with the fallback."""
    settings = _settings(velocity={"deadline_ms": 1e-6, "fallback_velocity": 77, "worker": "thread"})

    async def body(e):
        for p in range(60, 80):
            await play(e, (0x90, p, 64), (0x80, p, 0))

    e = drive(settings, "colorize", body)
    vel = note_on_velocities(out(e))
    assert len(vel) == 20 and e.metrics.counters["deadline_miss"] == 20
    # Waiting ends at once; an answer can only slip in if the thread beat the loop's next turn.
    assert vel.count(77) >= 15


def test_an_inline_answer_later_than_the_deadline_is_counted():
    """Inline, the answer is there when the note leaves (waiting for it made the note late):
    it is used, and the lateness counted."""
    settings = _settings(velocity={"deadline_ms": 1e-6, "fallback_velocity": 77, "worker": "inline"})

    async def body(e):
        for p in range(60, 80):
            await play(e, (0x90, p, 64), (0x80, p, 0))

    e = drive(settings, "colorize", body)
    assert len(note_on_velocities(out(e))) == 20 and e.metrics.counters["deadline_miss"] == 20


def test_in_time_the_model_answers_and_nothing_is_missed():
    settings = _settings(velocity={"deadline_ms": 100, "fallback_velocity": 77})

    async def body(e):
        for p in (60, 64, 67, 72, 76, 79, 84, 60, 64, 67):
            await play(e, (0x90, p, 64), (0x80, p, 0))

    e = drive(settings, "colorize", body)
    vel = note_on_velocities(out(e))
    assert len(vel) == 10 and e.metrics.counters["deadline_miss"] == 0
    assert vel != [77] * 10 and vel != [64] * 10  # the model's, neither the fallback nor the player's


# ---- performer controls ------------------------------------------------------------------------


def test_strength_mode_and_bypass_controls():
    settings = _settings(velocity={"deadline_ms": 100, "mode": "blend"})
    seen = {}

    async def body(e):
        await play(e, (0xB0, C.strength_cc, 0), (0x90, 60, 99), (0x80, 60, 0))  # strength 0: the player's velocity
        seen["strength0"] = e.velocity.strength
        await play(e, (0xB0, C.strength_cc, 127))
        seen["strength1"] = e.velocity.strength
        await play(e, (0xB0, C.bypass_cc, 127), (0x90, 61, 33), (0x80, 61, 0))  # bypassed: the player's velocity
        seen["bypass"] = e.velocity.bypass
        await play(e, (0xB0, C.bypass_cc, 0))
        seen["bypass_off"] = e.velocity.bypass
        for value, mode in ((0, "replace"), (64, "blend"), (127, "flat-only")):
            await play(e, (0xB0, C.mode_cc, value))
            seen[mode] = e.velocity.mode
        await play(e, (0x90, 62, 50))  # sounding across a mode switch: the switch releases it
        await play(e, (0xB0, C.mode_cc, 0))
        seen["after_switch"] = sounding(out(e))

    e = drive(settings, "colorize", body)
    assert note_on_velocities(out(e))[:2] == [99, 33]
    assert seen["strength0"] == 0.0 and seen["strength1"] == 1.0
    assert seen["bypass"] is True and seen["bypass_off"] is False
    assert [seen[m] for m in ("replace", "blend", "flat-only")] == ["replace", "blend", "flat-only"]
    assert seen["after_switch"] == {}
    assert not any(m[0] & 0xF0 == 0xB0 and m[1] in (C.strength_cc, C.mode_cc, C.bypass_cc) for m in out(e))  # consumed


def test_panic_control_releases_every_sounding_note():
    settings = _settings(velocity={"deadline_ms": 100})
    seen = {}

    async def body(e):
        await play(e, (0x90, 60, 64), (0x91, 64, 64), (0xB0, 64, 127))
        seen["before"] = sounding(out(e))
        await play(e, (0xB0, C.panic_cc, 127))

    e = drive(settings, "colorize", body)
    assert seen["before"] == {(0, 60): 1, (1, 64): 1}
    msgs = out(e)
    assert sounding(msgs) == {} and control(0, 64, 0) in msgs  # the pedal is lifted too
    assert e.metrics.counters["panics"] >= 1


def test_phrase_controls_and_state_out():
    settings = _settings(velocity={"deadline_ms": 100}, phrase={"silence_ms": 200, "length_mode": "seconds", "response_seconds": 1.0})
    seen = {}

    async def body(e):
        cr = e.phrase
        await play(e, (0xB0, C.temperature_cc, 127), (0xB0, C.length_cc, 0))
        seen["temperature"], seen["length"] = cr.temperature, cr.length_s
        await play(e, (0xB0, C.phrase_cc, 0))
        seen["enabled_off"] = cr.enabled
        await play(e, (0xB0, C.phrase_cc, 127))
        seen["enabled_on"] = cr.enabled
        await play(e, (0x90, 60, 80))
        seen["state_listening"] = cr.state
        await play(e, (0x80, 60, 0))

    e = drive(settings, "both", body)
    assert seen["temperature"] == pytest.approx(1.8) and seen["length"] == pytest.approx(1.0)
    assert seen["enabled_off"] is False and seen["enabled_on"] is True
    states = [m[2] for m in out(e) if m[0] & 0xF0 == 0xB0 and m[1] == C.state_out_cc]
    assert seen["state_listening"] == 64 and 0 in states and 64 in states  # idle, then listening, on the state CC


# ---- what is never dropped ---------------------------------------------------------------------


def test_a_full_queue_drops_note_ons_but_never_note_offs_pedal_or_clock():
    settings = _settings(velocity={"deadline_ms": 100}, engine={"input_queue": 16})
    sent = {"note_off": 0, "pedal": 0, "clock": 0, "note_on": 0}

    async def body(e):
        now = time.monotonic()
        for k in range(10_000):  # one burst: the pump runs only once it is all queued
            kind = k % 4
            if kind == 0:
                e.deliver_now(now, note_on(0, 40 + k % 40, 64))
                sent["note_on"] += 1
            elif kind == 1:
                e.deliver_now(now, note_off(0, 40 + k % 40))
                sent["note_off"] += 1
            elif kind == 2:
                e.deliver_now(now, control(0, 64, 127 if k % 8 == 2 else 0))
                sent["pedal"] += 1
            else:
                e.deliver_now(now, b"\xf8")
                sent["clock"] += 1
        await e.drain(30)

    e = drive(settings, "colorize", body)
    msgs = out(e)
    c = e.metrics.counters
    note_ons = sum(1 for m in msgs if m[0] == 0x90 and m[2] > 0)
    assert sum(1 for m in msgs if m[0] == 0x80) >= sent["note_off"]  # panic at shutdown may add more, never fewer
    assert sum(1 for m in msgs if m[0] == 0xB0 and m[1] == 64) >= sent["pedal"]
    assert sum(1 for m in msgs if m == b"\xf8") == sent["clock"]
    assert note_ons < sent["note_on"] and c["dropped_queue_full"] == sent["note_on"] - note_ons == c["dropped"]


# ---- panic per source --------------------------------------------------------------------------


class PerSource:
    """A routed sink that keeps what went back to each source."""

    name = "per-source"

    def __init__(self) -> None:
        self.got: dict[int, list[bytes]] = {}

    def send_from(self, source: int, data: bytes) -> None:
        self.got.setdefault(source, []).append(data)

    def close(self) -> None:
        pass


def test_a_sources_panic_releases_only_that_sources_notes():
    settings = _settings(velocity={"deadline_ms": 100})
    routed, seen = PerSource(), {}

    async def body(e):
        await play(e, (0x90, 60, 64), (0x90, 62, 64), source=1)
        await play(e, (0x90, 60, 64), (0x91, 70, 64), source=2)
        e.panic("source 1 left", source=1)
        seen["after_panic"] = {s: sounding(m) for s, m in routed.got.items()}
        e.forget_source(2, "source 2 timed out")
        seen["after_forget"] = {s: sounding(m) for s, m in routed.got.items()}

    drive(settings, "colorize", body, sinks=[routed])
    assert seen["after_panic"] == {1: {}, 2: {(0, 60): 1, (1, 70): 1}}
    assert seen["after_forget"] == {1: {}, 2: {}}


# ---- the last bars as a melody -----------------------------------------------------------------


def test_melody_reads_the_last_bar_on_the_midi_clocks_grid():
    settings = _settings(engine={"bpm": 120})  # the clock runs at 100 bpm: its grid must win
    seen = {}

    async def body(e):
        t0 = asyncio.get_running_loop().time() - 3.0
        tick, step = 0.6 / 24, 0.15  # 100 bpm: 25 ms a tick, 150 ms a sixteenth
        # Start, then the downbeat on the first tick (MIDI 1.0) at t0: 5 beats of ticks up to now
        events = [(t0 - tick, b"\xfa")] + [(t0 + tick * k, b"\xf8") for k in range(0, 121)]
        events += [
            (t0 + step * 10 + 0.01, note_on(0, 72, 80)),
            (t0 + step * 10 + 0.02, note_on(0, 60, 80)),
            (t0 + step * 12 + 0.05, note_off(0, 72)),
            (t0 + step * 12 + 0.05, note_off(0, 60)),
        ]
        for t, data in sorted(events, key=lambda ev: ev[0]):
            e.deliver_now(time.monotonic(), data, music_t=t)
        await e.drain()
        seen["melody"] = e.melody(0, 0, bars=1)

    drive(settings, "thru", body)
    expected = [0] * 16
    expected[6], expected[8] = melody_event(72), NOTE_OFF  # the bar ends on line 20: lines 4..20, notes on line 10 and off in 12
    assert seen["melody"].tolist() == expected


def test_without_a_clock_the_last_16_bars_are_read_at_the_set_tempo():
    settings = _settings(engine={"bpm": 120})  # 125 ms a sixteenth, the default window holds 16 bars
    seen = {}

    async def body(e):
        now = asyncio.get_running_loop().time()
        e.deliver_now(time.monotonic(), note_on(0, 67, 80), music_t=now - 0.95)  # in the 8th sixteenth from the end
        e.deliver_now(time.monotonic(), note_off(0, 67), music_t=now - 0.56)  # released in the 5th from the end
        await e.drain()
        seen["melody"] = e.melody(0, 0, bars=16)

    drive(settings, "thru", body)
    m = seen["melody"]
    assert m.shape == (256,) and m[-8] == melody_event(67) and m[-5] == NOTE_OFF
    assert (m[:-8] == 0).all() and (m[-7:-5] == 0).all() and (m[-4:] == 0).all()


def test_a_call_whose_note_ons_and_offs_arrive_together_still_ends_and_is_answered():
    """A remote session's notes can reach the pump with their note-offs in one batch (MQTT hands
    over everything that has arrived): the keys are up, so the silence must still end the call."""
    settings = _settings(phrase={"silence_ms": 200, "length_mode": "seconds", "response_seconds": 1.0, "seed": 2})
    seen = {}

    async def body(e):
        for p in (60, 64, 67, 72, 67, 64):
            e.deliver_now(e.now_music(), note_on(0, p, 80), source=1)
            e.deliver_now(e.now_music(), note_off(0, p), source=1)
            await asyncio.sleep(0.1)
        end = time.monotonic() + 5
        while e.sessions[1].phrase.state != RESPONDING and time.monotonic() < end:
            await asyncio.sleep(0.02)
        seen["state"] = e.sessions[1].phrase.state

    drive(settings, "continue", body)
    assert seen["state"] == RESPONDING


def test_one_source_cannot_fill_the_input_queue_for_the_others():
    settings = _settings(engine={"source_queue": 500, "input_queue": 16384})
    sink = ListSink()
    seen = {}

    async def body(e):
        now = e.now_music()
        for i in range(3000):  # a flood from source 1, all at once, before the pump runs
            e.deliver_now(now, note_on(0, 36 + i % 60, 90), source=1)
            e.deliver_now(now, note_off(0, 36 + i % 60), source=1)
        for p in range(60, 70):  # source 2 plays meanwhile
            e.deliver_now(now, note_on(1, p, 80), source=2)
            e.deliver_now(now, note_off(1, p), source=2)
        await e.drain()
        seen.update(e.metrics.counters)

    drive(settings, "colorize", body, sinks=[sink])
    # source 1 keeps 500 messages waiting (250 notes and their note-offs); its other note-ons go,
    # its note-offs always pass
    assert seen["dropped_source_share"] == 2750
    assert sum(1 for m in sink.messages if m[0] == 0x91 and m[2] > 0) == 10  # nothing of source 2's dropped
