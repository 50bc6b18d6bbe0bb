"""Fault drills for every model stage, through the engine with the shipped models: a killed
model's requests fall back at once and are counted, the runtime restarts it by itself, and answers
come back. No ports: the engine's output is recorded by a tagged sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from cadenza.config.settings import Settings, load_settings
from cadenza.messages import note_off, note_on
from cadenza.models.runtime import Backoff
from cadenza.stream.build import build_engine
from cadenza.stream.engine import Engine
from cadenza.stream.phrase import IDLE, RESPONDING
from cadenza.stream.sinks.record import Recorder

from .conftest import sounding


async def _until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


def _settings(**sections) -> Settings:
    return load_settings(overrides={"engine": {"stats_interval_s": 0}, **sections})


async def _with_engine(
    settings: Settings,
    body: Callable[[Engine, list[tuple[float, bytes, object]]], Awaitable[None]],
    *,
    velocity: bool = False,
    lookahead: bool = False,
    phrase: bool = False,
) -> dict:
    mode = "colorize" if velocity else "lookahead" if lookahead else "continue" if phrase else "thru"
    recorder = Recorder()  # its events: (music time, data, tag)
    async with build_engine(settings, mode, [recorder]) as engine:
        if lookahead:
            engine.lookahead.margin = settings.velocity.lookahead_s / 2  # a generous model time: a busy CI machine
            engine.lookahead.stage.backoff = Backoff(first=1.0, at_once=False)  # down long enough for notes to fall due meanwhile
        run = asyncio.create_task(engine.run())
        try:
            await asyncio.sleep(0.05)
            await body(engine, recorder.events)
        finally:
            engine.stop()
            await run
    return engine.metrics.snapshot()


def _play(engine: Engine, pitch: int, velocity: int = 64) -> None:
    engine.deliver_now(time.monotonic(), note_on(0, pitch, velocity))


def _release(engine: Engine, pitch: int) -> None:
    engine.deliver_now(time.monotonic(), note_off(0, pitch))


def _note_ons(out, tag=None) -> list[bytes]:
    return [d for _, d, t in out if d[0] & 0xF0 == 0x90 and d[2] > 0 and (tag is None or t == tag)]


@pytest.mark.parametrize("worker", ["inline", "thread"])
def test_velocity_model_killed_releases_notes_falls_back_and_restarts(worker):
    settings = _settings(velocity={"worker": worker, "deadline_ms": 50.0, "fallback_velocity": 33})

    async def body(engine: Engine, out) -> None:
        for p in (60, 64, 67):
            _play(engine, p)
        await _until(lambda: len(_note_ons(out)) == 3)
        stage = engine.velocity.worker.stage
        stage.backoff = Backoff(first=1.0, at_once=False)  # down long enough to play into the gap
        engine.velocity.worker.kill()
        await _until(lambda: not stage.alive)
        await _until(lambda: sounding([d for _, d, _ in out]) == {})  # the chord was released
        _play(engine, 72)  # meanwhile: the fallback velocity at once
        await _until(lambda: len(_note_ons(out)) == 4)
        assert _note_ons(out)[-1][2] == 33
        await _until(lambda: stage.stats.restarts == 1)
        _release(engine, 72)
        for p in (48, 52, 55, 59):
            _play(engine, p)
            await asyncio.sleep(0.01)
        await _until(lambda: len(_note_ons(out)) == 8)
        assert len({d[2] for d in _note_ons(out)[-4:]}) > 1  # the model answers again

    snap = asyncio.run(_with_engine(settings, body, velocity=True))
    c = snap["counters"]
    assert c["worker_restarts"] == 1 and c["velocity_crashes"] == 1 and c["velocity_restarts"] == 1
    assert c["velocity_fallbacks"] >= 1 and c["deadline_miss"] >= 1
    assert c["velocity_requests"] >= 7
    assert snap["latency"]["model_velocity"]["n"] >= 2


def test_lookahead_model_killed_due_notes_get_the_fallback_until_it_restarts():
    settings = _settings(velocity={"lookahead_s": 0.4, "fallback_velocity": 33})

    async def body(engine: Engine, out) -> None:
        la = engine.lookahead
        for p in (60, 62, 64, 65):
            _play(engine, p, 90)
            await asyncio.sleep(0.02)
            _release(engine, p)
        await _until(lambda: len(_note_ons(out)) == 4)
        served = la.stage.stats.requests
        assert served == 4
        la.kill()
        await _until(lambda: not la.stage.alive)
        for p in (67, 69):  # due while the model is down
            _play(engine, p, 90)
            _release(engine, p)
        await _until(lambda: len(_note_ons(out)) == 6)
        assert [d[2] for d in _note_ons(out)[-2:]] == [33, 33]
        await _until(lambda: la.stage.stats.restarts == 1)
        for p in (71, 72, 74):
            _play(engine, p, 90)
            await asyncio.sleep(0.02)
            _release(engine, p)
        await _until(lambda: len(_note_ons(out)) == 9)
        assert la.stage.stats.requests == served + 3  # answered by the model again

    snap = asyncio.run(_with_engine(settings, body, lookahead=True))
    c = snap["counters"]
    assert c["lookahead_crashes"] == 1 and c["lookahead_restarts"] == 1
    assert c["lookahead_fallbacks"] == 2 and c["deadline_miss"] >= 2


def test_phrase_model_killed_cuts_the_answer_and_answers_the_next_phrase():
    settings = _settings(phrase={"length_mode": "seconds", "response_seconds": 4.0, "seed": 1, "silence_ms": 5000})

    async def phrase(engine: Engine) -> None:
        for p in (60, 62, 64, 65, 67, 65, 64, 62):
            _play(engine, p, 80)
            await asyncio.sleep(0.03)
            _release(engine, p)
            await asyncio.sleep(0.01)
        await engine.drain()
        await engine.phrase.worker.caught_up()
        engine.phrase.end_call(engine.now_music())

    async def body(engine: Engine, out) -> None:
        cr = engine.phrase
        stage = cr.worker.stage
        stage.backoff = Backoff(first=2.0, at_once=False)  # down long enough to play a phrase into the gap
        await phrase(engine)
        gen = cr._gen
        await _until(lambda: cr._sounding)  # the answer is playing, a note of it is down
        cr.worker.kill()
        await _until(lambda: stage.stats.crashes == 1)
        assert cr.state != RESPONDING and cr._gen is None  # cut
        assert sounding([d for _, d, _ in out]) == {}  # its notes were released
        n_answer = len([d for _, d, t in out if t == gen])
        await asyncio.sleep(0.3)
        assert len([d for _, d, t in out if t == gen]) == n_answer  # nothing more of it plays
        assert not stage.alive
        await phrase(engine)  # a phrase ending while the model is down is over at once
        assert cr.state == IDLE
        await _until(lambda: stage.stats.restarts == 1)
        await phrase(engine)
        gen2 = cr._gen
        await _until(lambda: _note_ons(out, gen2))  # answered again

    snap = asyncio.run(_with_engine(settings, body, phrase=True))
    c = snap["counters"]
    assert c["phrase_crashes"] == 1 and c["phrase_restarts"] == 1 and c["phrase_fallbacks"] >= 1
