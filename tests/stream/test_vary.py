"""The vary stage in process: the engine built for ``vary`` with the shipped 2-bar MusicVAE, no ports."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cadenza.buffers.pianoroll import MIN_PITCH, melody_event
from cadenza.config.settings import load_settings
from cadenza.messages import control, note_off, note_on
from cadenza.models.vae.data import HI, LO
from cadenza.stream.build import build_engine
from cadenza.stream.sinks.record import Recorder
from cadenza.stream.vary import IDLE, LISTENING, PLAYING, to_vae_events

from .conftest import sounding

STEP = 15 / 240  # 240 bpm
STATE_CC = 27


async def _session(settings, body) -> dict:
    recorder = Recorder()
    async with build_engine(settings, "vary", [recorder]) as engine:
        run = asyncio.create_task(engine.run())
        try:
            await asyncio.sleep(0.05)
            await body(engine, recorder.events)
        finally:
            engine.stop()
            await run
    return engine.metrics.snapshot()


async def _loop(engine, t0: float, loops: int, pitches=(60, 62, 64, 65, 67, 65, 64, 62)) -> None:
    """``loops`` 2-bar loops of eighth notes from ``t0`` (music time = monotonic here)."""
    for rep in range(loops):
        for i, p in enumerate(pitches):
            await asyncio.sleep(max(0.0, t0 + (rep * 32 + i * 4) * STEP - time.monotonic()))
            engine.deliver_now(time.monotonic(), note_on(0, p, 80))
            await asyncio.sleep(STEP * 2)
            engine.deliver_now(time.monotonic(), note_off(0, p))


def test_window_events_fold_into_the_models_range():
    ev = np.array([0, melody_event(60), 1, melody_event(100), 0, melody_event(30)], np.int16)
    out = to_vae_events(ev)
    pitches = out[out >= 2] - 2 + LO
    assert list(out[[0, 2, 4]]) == [0, 1, 0]
    assert list(pitches) == [60, 100 - 12, 30 + 12] and all(LO <= p <= HI for p in pitches)
    assert MIN_PITCH <= 30


def test_the_loop_comes_back_varied_on_the_grid_the_state_cc_follows_and_silence_ends_it():
    settings = load_settings(overrides={"engine": {"stats_interval_s": 0, "bpm": 240.0}})
    states: list[int] = []

    async def body(engine, out) -> None:
        t0 = time.monotonic() + 0.05
        await _loop(engine, t0, loops=2)
        await asyncio.sleep(32 * STEP + 0.3)  # a silent loop: the variation ends after it
        states.extend(d[2] for _, d, tag in out if tag == "state")

    snap = asyncio.run(_session(settings, body))
    assert states == [LISTENING, PLAYING, IDLE], states
    assert snap["counters"]["vae_requests"] == 2  # one per loop; the silent third ends it


def test_variation_notes_start_on_sixteenths_after_the_first_loop_and_panic_releases_them():
    settings = load_settings(overrides={"engine": {"stats_interval_s": 0, "bpm": 240.0}, "controls": {"state_out_cc": None}})
    seen: dict = {}

    async def body(engine, out) -> None:
        await _loop(engine, time.monotonic() + 0.05, loops=2)
        seen["anchor"] = engine.vary._anchor
        await asyncio.sleep(0.2)
        engine.deliver_now(time.monotonic(), control(0, 23, 127))  # panic
        await asyncio.sleep(0.2)
        seen["out"] = list(out)

    asyncio.run(_session(settings, body))
    out, anchor = seen["out"], seen["anchor"]
    ons = [(t, d) for t, d, tag in out if d[0] == 0x91 and d[2] > 0]
    assert ons, "no variation"
    assert ons[0][0] >= anchor + 32 * STEP - 1e-6  # not before the loop line after the first loop
    for t, _ in ons:
        k = (t - anchor) / STEP
        assert abs(k - round(k)) < 1e-6, "variation off the sixteenth grid"
    assert not {k for k in sounding([d for _, d, _ in out]) if k[0] == 1}


def test_morph_and_attribute_controls_reach_the_model():
    settings = load_settings(overrides={"engine": {"stats_interval_s": 0, "bpm": 240.0}, "controls": {"state_out_cc": None}})
    seen: dict = {}

    async def body(engine, out) -> None:
        engine.deliver_now(time.monotonic(), control(0, 29, 127))  # morph
        engine.deliver_now(time.monotonic(), control(0, 30, 127))  # density +2
        engine.deliver_now(time.monotonic(), control(0, 28, 0))  # no noise
        await asyncio.sleep(0.01)
        seen["mode"], seen["attrs"], seen["amount"] = engine.vary.mode, dict(engine.vary.attributes), engine.vary.amount
        await _loop(engine, time.monotonic() + 0.05, loops=2)
        await asyncio.sleep(0.1)

    snap = asyncio.run(_session(settings, body))
    assert seen["mode"] == "morph" and seen["amount"] == 0.0
    assert seen["attrs"]["density"] == 2.0 and seen["attrs"]["register"] == 0.0
    assert snap["counters"]["vae_requests"] >= 1 and snap["counters"].get("vae_crashes", 0) == 0
