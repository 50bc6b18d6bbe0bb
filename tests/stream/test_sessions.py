"""Several sources in one engine, as the MQTT daemon drives it (no broker here): each source's
controls, answers, loops and delayed notes stay its own. The shipped models, in process."""

from __future__ import annotations

import asyncio
import threading
import time

from cadenza.config.settings import load_settings
from cadenza.messages import control, note_off, note_on
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.worker import PhraseWorker, ResponseParams
from cadenza.stream.build import build_engine
from cadenza.stream.engine import Engine
from cadenza.stream.phrase import IDLE, RESPONDING, AnswerTag
from cadenza.stream.sinks.record import Recorder
from cadenza.stream.vary import PLAYING, VaryTag

from .conftest import sounding

C = load_settings().controls  # the shipped CC map


class PerSource:
    """A routed sink that keeps what went back to each source (as the MQTT daemon's topics would)."""

    name = "per-source"

    def __init__(self) -> None:
        self.got: dict[int, list[bytes]] = {}

    def send_from(self, source: int, data: bytes) -> None:
        self.got.setdefault(source, []).append(data)

    def to(self, source: int) -> list[bytes]:
        return self.got.get(source, [])

    def close(self) -> None:
        pass


def _settings(**sections):
    return load_settings(overrides={"engine": {"stats_interval_s": 0}, **sections})


def run(settings, mode: str, body) -> tuple[PerSource, Recorder, Engine]:
    routed, recorder = PerSource(), Recorder()

    async def main() -> Engine:
        async with build_engine(settings, mode, [routed, recorder]) as engine:
            task = asyncio.create_task(engine.run())
            try:
                await body(engine, routed, recorder)
                await engine.drain()
            finally:
                engine.stop()
                await task
            return engine

    return routed, recorder, asyncio.run(main())


async def play(engine: Engine, source: int, *msgs: bytes) -> None:
    for m in msgs:
        engine.deliver_now(time.monotonic(), m, source=source)
    await engine.drain()


async def until(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def note_ons(messages: list[bytes], channel: int | None = None) -> list[bytes]:
    return [m for m in messages if m[0] & 0xF0 == 0x90 and m[2] > 0 and (channel is None or m[0] & 0x0F == channel)]


# ---- performer controls ------------------------------------------------------------------------


def test_a_sessions_controls_leave_the_other_sessions_notes_and_settings_alone():
    settings = _settings(velocity={"deadline_ms": 100, "mode": "blend", "strength": 0.5})
    seen = {}

    async def body(e: Engine, routed: PerSource, _rec) -> None:
        await play(e, 0, note_on(0, 48, 64))
        await play(e, 1, note_on(0, 60, 64), note_on(1, 62, 64))
        await play(e, 2, note_on(0, 60, 64), note_on(0, 67, 64))
        await play(e, 1, control(0, C.strength_cc, 127), control(0, C.bypass_cc, 127), control(0, C.temperature_cc, 127))
        await play(e, 1, control(0, C.mode_cc, 0))  # replace: a mode switch releases source 1's notes only
        seen["after_mode"] = {s: sounding(routed.to(s)) for s in (0, 1, 2)}
        await play(e, 1, note_on(0, 64, 64))
        await play(e, 1, control(0, C.panic_cc, 127))
        seen["after_panic"] = {s: sounding(routed.to(s)) for s in (0, 1, 2)}
        seen["settings"] = {
            s: (
                e.sessions[s].velocity.mode,
                e.sessions[s].velocity.strength,
                e.sessions[s].velocity.bypass,
                e.sessions[s].phrase.temperature,
            )
            for s in (0, 1, 2)
        }

    routed, _, e = run(settings, "both", body)
    assert seen["after_mode"] == {0: {(0, 48): 1}, 1: {}, 2: {(0, 60): 1, (0, 67): 1}}
    assert seen["after_panic"] == {0: {(0, 48): 1}, 1: {}, 2: {(0, 60): 1, (0, 67): 1}}
    t = settings.phrase.temperature
    assert seen["settings"] == {0: ("blend", 0.5, False, t), 1: ("replace", 1.0, True, 1.8), 2: ("blend", 0.5, False, t)}
    assert not any(m[0] & 0xF0 == 0xB0 and m[1] in (C.strength_cc, C.mode_cc, C.panic_cc) for m in routed.to(1))  # consumed
    assert all(sounding(routed.to(s)) == {} for s in (0, 1, 2))  # shutdown releases every session


# ---- call and response -------------------------------------------------------------------------

CALLS = {1: (60, 62, 64, 65, 67, 65, 64, 62), 2: (72, 71, 69, 67, 69, 71, 72, 74)}


async def call(e: Engine, source: int, pitches) -> None:
    for p in pitches:
        await play(e, source, note_on(0, p, 80))
        await asyncio.sleep(0.02)
        await play(e, source, note_off(0, p))


def _phrase_settings(seconds: float):
    return _settings(phrase={"length_mode": "seconds", "response_seconds": seconds, "seed": 1, "silence_ms": 5000, "best_of": 1})


def test_two_sessions_are_answered_at_once_each_from_its_own_context_on_its_own_source():
    seen = {}

    async def body(e: Engine, routed: PerSource, rec: Recorder) -> None:
        await asyncio.gather(call(e, 1, CALLS[1]), call(e, 2, CALLS[2]))
        await e.phrase_stage.worker.caught_up()
        contexts = e.phrase_stage.worker._contexts
        seen["called"] = {s: {tk.token_name(t) for t in contexts[s].hist if tk.token_name(t).startswith("ON_")} for s in (1, 2)}
        now = e.now_music()
        for s in (1, 2):
            e.sessions[s].phrase.end_call(now)
        seen["states"] = {s: e.sessions[s].phrase.state for s in (0, 1, 2)}
        await until(lambda: all(e.sessions[s].phrase.state == IDLE for s in (1, 2)))

    routed, rec, e = run(_phrase_settings(1.0), "continue", body)
    assert seen["called"] == {s: {f"ON_{p}" for p in CALLS[s]} for s in (1, 2)}  # a context per session
    assert seen["states"] == {0: IDLE, 1: RESPONDING, 2: RESPONDING}
    answers = [(tag, d) for _, d, tag in rec.events if isinstance(tag, AnswerTag)]
    for s in (1, 2):
        answered = note_ons([d for tag, d in answers if tag.source == s])
        assert answered, f"source {s} got no answer"
        assert len(note_ons(routed.to(s))) == len(CALLS[s]) + len(answered)  # its call echoed, its answer
        assert sounding(routed.to(s)) == {}
    assert note_ons(routed.to(0)) == []


def test_forgetting_one_session_cuts_its_answer_and_leaves_the_other_playing():
    seen = {}

    async def body(e: Engine, routed: PerSource, rec: Recorder) -> None:
        await asyncio.gather(call(e, 1, CALLS[1]), call(e, 2, CALLS[2]))
        await e.phrase_stage.worker.caught_up()
        now = e.now_music()
        for s in (1, 2):
            e.sessions[s].phrase.end_call(now)
        await until(lambda: all(len(note_ons(routed.to(s))) > len(CALLS[s]) for s in (1, 2)))  # both are answering
        e.forget_source(1, "session 1 said bye")
        seen["left"] = len(routed.to(1))
        seen["sounding_1"] = sounding(routed.to(1))
        n2 = len(note_ons(routed.to(2)))
        await until(lambda: len(note_ons(routed.to(2))) > n2)  # the other answer goes on
        seen["sessions"] = sorted(e.sessions)
        seen["more_1"] = routed.to(1)[seen["left"] :]

    routed, rec, e = run(_phrase_settings(4.0), "continue", body)
    assert seen["sounding_1"] == {} and seen["more_1"] == []
    assert seen["sessions"] == [0, 2]


def test_the_phrase_model_interleaves_the_sessions_answers_and_feeds_a_session_after_its_own():
    """One model thread: a short answer of session 2 is not held up by session 1's long one, and
    what session 1 plays meanwhile reaches its context once its answer is done (not cutting it)."""
    from cadenza.models.phrase.live import LivePhrase, load_phrase

    model = load_phrase(load_settings().phrase.weights, device="cpu")
    events: list[int] = []
    done: dict[int, int] = {}

    async def main() -> dict:
        worker = PhraseWorker(lambda: LivePhrase(model), asyncio.get_running_loop())
        await asyncio.to_thread(worker.start)
        try:
            for s, pitches in CALLS.items():
                for i, p in enumerate(pitches):
                    worker.feed(s, 0.25 * i, note_on(0, p, 80))
                    worker.feed(s, 0.25 * i + 0.2, note_off(0, p))
            for s, seconds in ((1, 8.0), (2, 2.0)):
                params = ResponseParams(start_t=2.5, seconds=seconds, temperature=1.0, top_k=0, top_p=0.95, seed=s)
                worker.respond(s, s, threading.Event(), params, lambda g, t, m: events.append(g), lambda g: done.setdefault(g, len(events)))
            worker.feed(1, 3.0, note_on(0, 50, 80))  # played during its own answer
            await until(lambda: len(done) == 2)
            await worker.caught_up()
            return {s: [tk.token_name(t) for t in live.hist] for s, live in worker._contexts.items()}
        finally:
            worker.stop()

    hist = asyncio.run(main())
    last_of_1 = max(i for i, g in enumerate(events) if g == 1)
    assert events.index(2) < last_of_1, "session 2 waited for session 1's whole answer"
    assert hist[1][-1] == "ON_50" and events.count(1) > 2  # fed after the answer, which was not cut at its first step
    for s, pitches in CALLS.items():  # each context begins with its own call, and only that
        assert [name for name in hist[s] if name.startswith("ON_")][: len(pitches)] == [f"ON_{p}" for p in pitches]


# ---- vary --------------------------------------------------------------------------------------

STEP = 15 / 240  # a sixteenth at 240 bpm


async def loop(e: Engine, source: int, t0: float, loops: int, pitches) -> None:
    """``loops`` 2-bar loops of eighth notes from ``t0`` on ``source``."""
    for rep in range(loops):
        for i, p in enumerate(pitches):
            await asyncio.sleep(max(0.0, t0 + (rep * 32 + i * 4) * STEP - time.monotonic()))
            e.deliver_now(time.monotonic(), note_on(0, p, 80), source=source)
            await asyncio.sleep(STEP * 2)
            e.deliver_now(time.monotonic(), note_off(0, p), source=source)


def test_two_sessions_vary_their_own_loops_on_their_own_grids():
    settings = _settings(engine={"stats_interval_s": 0, "bpm": 240.0}, controls={"state_out_cc": None})
    seen = {}

    async def body(e: Engine, routed: PerSource, rec: Recorder) -> None:
        t0 = time.monotonic() + 0.05
        await asyncio.gather(
            loop(e, 1, t0, 2, (60, 62, 64, 65, 67, 65, 64, 62)),
            loop(e, 2, t0 + 6 * STEP, 2, (72, 74, 76, 77, 79, 77, 76, 74)),  # its own grid, 6 sixteenths later
        )
        await asyncio.sleep(0.2)
        seen["anchor"] = {s: e.sessions[s].vary._anchor for s in (1, 2)}
        seen["states"] = {s: e.sessions[s].vary.state for s in (0, 1, 2)}
        await play(e, 1, control(0, C.panic_cc, 127))  # stops source 1's variation only
        seen["states_after_panic"] = {s: e.sessions[s].vary.state for s in (1, 2)}

    routed, rec, e = run(settings, "vary", body)
    assert seen["states"] == {0: 0, 1: PLAYING, 2: PLAYING}
    varied = [(t, d, tag) for t, d, tag in rec.events if isinstance(tag, VaryTag) and d[0] == 0x91 and d[2] > 0]
    for s in (1, 2):
        mine = [(t, d) for t, d, tag in varied if tag.source == s]
        assert mine, f"no variation for source {s}"
        anchor = seen["anchor"][s]
        for t, _ in mine:
            k = (t - anchor) / STEP
            assert abs(k - round(k)) < 1e-6 and k >= 32 - 1e-6, "off its own grid"
        assert len(note_ons(routed.to(s), channel=1)) == len(mine)  # routed back to its own source
    assert abs((seen["anchor"][2] - seen["anchor"][1]) / STEP - 6) < 0.5
    assert seen["states_after_panic"] == {1: 0, 2: PLAYING}
    assert e.metrics.counters["vae_requests"] == 4  # two loops each


# ---- lookahead ---------------------------------------------------------------------------------


def test_lookahead_delays_each_session_to_itself_and_drops_what_a_forgotten_session_had_pending():
    settings = _settings(velocity={"lookahead_s": 0.3})

    async def body(e: Engine, routed: PerSource, _rec) -> None:
        for p in (60, 64, 67):
            await play(e, 1, note_on(0, p, 90))
            await play(e, 2, note_on(0, p + 12, 90))
            await asyncio.sleep(0.03)
            await play(e, 1, note_off(0, p))
            await play(e, 2, note_off(0, p + 12))
        await until(lambda: len(note_ons(routed.to(2))) == 3)
        await play(e, 1, note_on(0, 72, 90))
        await play(e, 2, note_on(0, 84, 90), note_off(0, 84))
        e.forget_source(1, "session 1 timed out")  # before its last note is due
        await asyncio.sleep(0.5)

    routed, _, e = run(settings, "lookahead", body)
    assert [m[1] for m in note_ons(routed.to(1))] == [60, 64, 67]
    assert [m[1] for m in note_ons(routed.to(2))] == [72, 76, 79, 84]
    assert sounding(routed.to(1)) == {} and sounding(routed.to(2)) == {}
    assert note_ons(routed.to(0)) == []


# ---- MIDI clock --------------------------------------------------------------------------------


def test_each_session_follows_its_own_midi_clock():
    seen = {}

    async def body(e: Engine, routed: PerSource, _rec) -> None:
        t0 = asyncio.get_running_loop().time() - 2.0
        for source, bpm in ((1, 100.0), (2, 120.0)):
            tick = 60.0 / bpm / 24
            for k, data in enumerate([b"\xfa"] + [b"\xf8"] * 48):  # Start, two beats
                e.deliver_now(time.monotonic(), data, source=source, music_t=t0 + tick * k)
        await e.drain()
        seen["bpm"] = {s: e.sessions[s].clock.bpm for s in (0, 1, 2)}
        seen["running"] = {s: e.sessions[s].clock.running for s in (0, 1, 2)}

    routed, _, _ = run(_settings(), "thru", body)
    assert seen["running"] == {0: False, 1: True, 2: True}
    assert seen["bpm"][0] is None and abs(seen["bpm"][1] - 100.0) < 0.5 and abs(seen["bpm"][2] - 120.0) < 0.5
    assert routed.to(1).count(b"\xf8") == 48 and routed.to(2).count(b"\xf8") == 48  # passed through, to its own
