"""The model runtime's one failure policy, with the real causal velocity model: a killed model
answers every request meanwhile with its fallback at once (counted), restarts by itself after a
capped exponential backoff, and answers again from fresh session state; inline and in a thread."""

from __future__ import annotations

import asyncio

import pytest

from cadenza.models.runtime import Backoff, ModelStage
from cadenza.models.velocity.causal import load_causal_step
from cadenza.models.velocity.features import LiveVelocityFeatures
from cadenza.models.velocity.worker import VelocityWorker


def test_backoff_retries_at_once_then_doubles_up_to_the_cap():
    b = Backoff(first=0.05, cap=2.0)
    assert [b.delay(n) for n in range(1, 10)] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    late = Backoff(first=0.05, cap=2.0, at_once=False)
    assert [late.delay(n) for n in range(1, 9)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert late.delay(0) == pytest.approx(0.05)
    assert Backoff(first=0.3, cap=0.5, at_once=False).delay(2) == pytest.approx(0.5)


async def _wait(pred, timeout: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.005)


def _fresh_answers(pitches) -> list[float]:
    model, feats = load_causal_step(), LiveVelocityFeatures()
    state, out = model.initial_state(1), []
    for i, p in enumerate(pitches):
        v, state = model.step(feats.note_on(0.1 * i, p)[None], state)
        out.append(float(v[0]))
    return out


@pytest.mark.parametrize("inline", [True, False])
def test_killed_velocity_model_falls_back_then_restarts_with_backoff(inline):
    pitches = [60, 64, 67, 72]

    async def ask(worker: VelocityWorker, session) -> list[float | None]:
        futs = [worker.note_on(session, 0.1 * i, p) for i, p in enumerate(pitches)]
        worker.flush()
        done = [f for f in futs if f is not None]
        await asyncio.wait(done, timeout=10) if done else None
        return [None if f is None or f.cancelled() else f.result() for f in futs]

    async def run():
        loop = asyncio.get_running_loop()
        worker = VelocityWorker(
            load_model=load_causal_step,
            make_features=LiveVelocityFeatures,
            inline=inline,
            backoff=Backoff(first=0.05, cap=0.2, at_once=False),
        )
        events: list[tuple[str, float]] = []
        worker.start(loop)
        worker.stage.listen(lambda e, stage: events.append((e, loop.time())))
        try:
            first = await ask(worker, (0, 0))
            worker.kill()
            in_flight = worker.note_on((0, 1), 0.0, 60)  # queued behind the kill (thread) or refused (inline)
            worker.flush()
            await _wait(lambda: not worker.alive)
            assert worker.stage.restart_delay == pytest.approx(0.05)
            assert in_flight is None or (await asyncio.wait([in_flight], timeout=5)) and in_flight.cancelled()
            down = await ask(worker, (0, 0))  # while down: fallbacks at once, no future to wait for
            assert down == [None] * len(pitches)
            await _wait(lambda: worker.stats.restarts == 1)
            assert worker.alive
            again = await ask(worker, (0, 0))
            # a second crash soon after the restart waits twice as long
            worker.kill()
            worker.flush()
            await _wait(lambda: not worker.alive)
            assert worker.stage.restart_delay == pytest.approx(0.1)
            await _wait(lambda: worker.stats.restarts == 2)
            return first, again, events, worker.stats
        finally:
            worker.stop()

    first, again, events, stats = asyncio.run(run())
    fresh = _fresh_answers(pitches)
    assert first == pytest.approx(fresh, abs=1e-3)
    assert again == pytest.approx(fresh, abs=1e-3)  # session state starts over after a restart
    assert stats.crashes == 2 and stats.restarts == 2
    assert stats.fallbacks == len(pitches) + 1  # the refused burst and the note behind the kill
    assert stats.requests == 2 * len(pitches)
    assert [e for e, _ in events] == ["crash", "restart", "crash", "restart"]
    assert events[1][1] - events[0][1] >= 0.05 - 1e-3 and events[3][1] - events[2][1] >= 0.1 - 1e-3


def test_a_stopped_stage_does_not_restart():
    async def run():
        worker = VelocityWorker(
            load_model=load_causal_step, make_features=LiveVelocityFeatures, inline=True, backoff=Backoff(first=0.02, at_once=False)
        )
        worker.start(asyncio.get_running_loop())
        worker.kill()
        worker.stop()
        await asyncio.sleep(0.1)
        return worker.stage

    stage: ModelStage = asyncio.run(run())
    assert not stage.alive and stage.stats.crashes == 1 and stage.stats.restarts == 0


def test_default_policy_restarts_a_one_off_crash_at_once_and_a_crash_loop_later():
    async def run(backoff: Backoff) -> list[float]:
        worker = VelocityWorker(load_model=load_causal_step, make_features=LiveVelocityFeatures, inline=True, backoff=backoff)
        worker.start(asyncio.get_running_loop())
        delays = []
        try:
            for n in range(3):
                worker.kill()
                delays.append(worker.stage.restart_delay)
                await _wait(lambda n=n: worker.stats.restarts == n + 1)
        finally:
            worker.stop()
        return delays

    assert asyncio.run(run(Backoff(first=0.05))) == pytest.approx([0.0, 0.05, 0.1])
    # a stage that served long enough since its restart counts from the first delay again
    assert asyncio.run(run(Backoff(first=0.05, healthy_s=0.0))) == pytest.approx([0.0, 0.0, 0.0])
