"""The velocity batcher answers a burst (chords, many sessions, interleaved releases) exactly as
one note at a time per session would, driven directly and through the model runtime (inline and
in its thread), with the shipped weights; the keep-warm ticks between bursts, and the hidden
sides computed ahead after each burst, change nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cadenza.models.velocity.batching import VelocityBatcher
from cadenza.models.velocity.causal import load_causal_step
from cadenza.models.velocity.features import LiveVelocityFeatures
from cadenza.models.velocity.worker import VelocityWorker


def _burst(seed: int = 0, n: int = 300, sessions: int = 5):
    """(kind, session, t, arg) events: chords of up to 4, releases in between."""
    rng = np.random.default_rng(seed)
    ev, held, t = [], {s: [] for s in range(sessions)}, 0.0
    for _ in range(n):
        t += float(rng.choice([0.0, 0.0, 0.01, 0.2]))
        s = int(rng.integers(0, sessions))
        if held[s] and rng.random() < 0.4:
            ev.append(("off", s, t, held[s].pop(0)))
        else:
            for p in rng.choice(np.arange(40, 90), size=int(rng.choice([1, 1, 3, 4])), replace=False):
                ev.append(("on", s, t, int(p)))
                held[s].append(int(p))
    return ev


def _one_at_a_time(events) -> list[float]:
    model = load_causal_step()
    feats = {s: LiveVelocityFeatures() for s in range(5)}
    states = {s: model.initial_state(1) for s in range(5)}
    out = []
    for kind, s, t, p in events:
        if kind == "off":
            feats[s].note_off(t, p)
            continue
        v, states[s] = model.step(feats[s].note_on(t, p)[None], states[s])
        out.append(float(v[0]))
    return out


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("max_batch,burst,sessions", [(64, 37, 5), (2, 37, 5), (64, 1, 5), (64, 37, 1)])
def test_bursts_equal_one_note_at_a_time(inline, max_batch, burst, sessions):
    events = _burst(sessions=sessions)
    expected = _one_at_a_time(events)

    async def run():
        worker = VelocityWorker(load_model=load_causal_step, make_features=LiveVelocityFeatures, max_batch=max_batch, inline=inline)
        worker.start(asyncio.get_running_loop())
        futs = []
        try:
            for k in range(0, len(events), burst):  # bursts of 37 events cut through chords
                for kind, s, t, p in events[k : k + burst]:
                    if kind == "on":
                        futs.append(worker.note_on(s, t, p))
                    else:
                        worker.note_off(s, t, p)
                worker.flush()
                await asyncio.wait_for(asyncio.gather(*futs), 10)
                for _ in range(3):  # what the engine does while idle (a no-op for a thread)
                    worker.keep_warm()
        finally:
            worker.stop()
        assert (worker.batcher.scratch_n > 0) == inline
        return [f.result() for f in futs], worker.stats

    got, stats = asyncio.run(run())
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert stats.requests == len(expected)
    assert (stats.max_batch > 1) == (burst > 1)  # bursts really were answered together
    if inline:  # a session's first note in a burst finds its hidden side ready (burst 1: all of them)
        assert stats.prepared > (0.9 * len(expected) if burst == 1 else 0.5 * stats.batches)


@pytest.mark.parametrize("prepare", [True, False])
@pytest.mark.parametrize("max_batch,burst", [(64, 37), (2, 37), (64, 1)])
def test_batcher_without_a_loop_equals_one_note_at_a_time(prepare, max_batch, burst):
    """The synchronous batcher alone: what the runtime wraps. ``prepare_next`` runs where the
    inline worker runs it, after each burst's notes went out."""
    events = _burst()
    expected = _one_at_a_time(events)
    batcher = VelocityBatcher(load_causal_step(), LiveVelocityFeatures, max_batch=max_batch, prepare_ahead=prepare)
    got: list[float] = []
    for k in range(0, len(events), burst):
        got += batcher.apply([(kind, (0, s), t, p) for kind, s, t, p in events[k : k + burst]])
        if prepare:  # (a burst of releases only leaves nothing to prepare)
            batcher.prepare_next()
        batcher.keep_warm()
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert (batcher.stats.prepared > 0) == prepare


@pytest.mark.parametrize("max_batch", [64, 2])
def test_torch_step_in_rounds_equals_one_note_at_a_time(max_batch):
    """The torch form (what a GPU steps; a static-shape step presents the same interface): one
    batched ``step`` per round of distinct sessions, states concatenated and split again."""
    import torch

    from cadenza.models.velocity.causal import load_causal

    events = _burst(seed=1, n=120)
    expected = _one_at_a_time(events)
    batcher = VelocityBatcher(load_causal(), LiveVelocityFeatures, max_batch=max_batch)
    assert not batcher.numpy
    got: list[float] = []
    with torch.inference_mode():
        for k in range(0, len(events), 37):
            got += batcher.apply([(kind, (0, s), t, p) for kind, s, t, p in events[k : k + 37]])
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_reset_forgets_a_session_and_keeps_the_others():
    """A reset in the middle of a burst: notes before it use the old state, notes after it
    start from a fresh session, the other sessions go on."""
    events = _burst(seed=3, n=80, sessions=2)
    cut = len(events) // 2
    model = load_causal_step()
    batcher = VelocityBatcher(model, LiveVelocityFeatures)
    got = batcher.apply(
        [(kind, (0, s), t, p) for kind, s, t, p in events[:cut]]
        + [("reset", (0, 0), 0.0, 0)]
        + [(kind, (0, s), t, p) for kind, s, t, p in events[cut:]]
    )
    # reference: session 0 starts over at the cut (fresh features, fresh state)
    feats = {s: LiveVelocityFeatures() for s in range(2)}
    states = {s: model.initial_state(1) for s in range(2)}
    expected = []
    for i, (kind, s, t, p) in enumerate(events):
        if i == cut:
            feats[0], states[0] = LiveVelocityFeatures(), model.initial_state(1)
        if kind == "off":
            feats[s].note_off(t, p)
            continue
        v, states[s] = model.step(feats[s].note_on(t, p)[None], states[s])
        expected.append(float(v[0]))
    np.testing.assert_allclose(got, expected, atol=1e-3)
