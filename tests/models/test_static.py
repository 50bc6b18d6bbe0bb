"""Static-shape model steps (the GPU path) give the eager answers: the velocity step on fixed
buckets with padding, the phrase decode step over a preallocated cache. On a CPU the static paths
run eagerly; the CUDA-graph tests need a GPU (marker ``gpu``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cadenza.messages import note_off, note_on
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.live import LivePhrase
from cadenza.models.phrase.model import PhraseConfig, PhraseModel, load_phrase
from cadenza.models.phrase.static import StaticDecoder
from cadenza.models.velocity.causal import NumpyCausalStep, load_causal, load_causal_step, predict_causal
from cadenza.models.velocity.features import causal_features, synthetic_performance
from cadenza.models.velocity.static import StaticVelocityStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def causal():
    torch.set_num_threads(1)
    return load_causal()


def _sessions(n: int, notes: int = 40) -> np.ndarray:
    """Causal features of ``n`` different played pieces, note by note: (notes, n, F)."""
    return np.stack([causal_features(synthetic_performance(max(notes, 40), seed=s))[:notes] for s in range(n)], 1).astype(np.float32)


def _play(step, feats: np.ndarray, device="cpu") -> np.ndarray:
    """Every session's velocities, one batched step per note index: (notes, sessions)."""
    state = step.initial_state(feats.shape[1])
    out = []
    for x in feats:
        v, state = step.step(torch.from_numpy(x).to(device), state)
        out.append(v.cpu().numpy())
    return np.stack(out)


@pytest.mark.parametrize("sessions", [1, 3, 70])  # bucket 1; bucket 64 padded; more than the largest bucket
def test_static_velocity_step_equals_the_torch_step(causal, sessions):
    feats = _sessions(sessions)
    static = StaticVelocityStep(causal)
    assert not static.graphed and static.feat_mean.device.type == "cpu"
    want = _play(causal, feats)
    got = _play(static, feats)
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.ptp(got) > 1.0  # the sessions' velocities really vary


def test_static_velocity_step_equals_the_file_pass(causal):
    perf = synthetic_performance(120, seed=7)
    want = predict_causal(causal, perf)
    got = _play(StaticVelocityStep(causal), causal_features(perf)[:, None, :].astype(np.float32))[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_returned_state_is_not_overwritten_by_the_next_step(causal):
    static = StaticVelocityStep(causal)
    x = torch.from_numpy(_sessions(2)[0])
    _, s1 = static.step(x, static.initial_state(2))
    kept = s1.clone()
    static.step(x * 2.0, s1)
    torch.testing.assert_close(s1, kept)


@pytest.mark.skipif(torch.cuda.is_available(), reason="capture succeeds here")
def test_failed_capture_logs_one_line_and_runs_eagerly(causal, caplog):
    with caplog.at_level(logging.WARNING):
        static = StaticVelocityStep(causal, graphs=True)  # no CUDA: the capture must fail
    assert not static.graphed and static.fallback_reason
    assert [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    feats = _sessions(2, notes=10)
    np.testing.assert_allclose(_play(static, feats), _play(causal, feats), atol=1e-3)


def test_load_causal_step_chooses_the_form():
    assert isinstance(load_causal_step(device="cpu"), NumpyCausalStep)
    assert isinstance(load_causal_step(device="cpu", static=True), StaticVelocityStep)


def test_worker_with_the_static_step_answers_like_the_numpy_step():
    """The worker's torch path (states concatenated per round, narrowed back per session) over
    the static step: what the GPU runs, here on the CPU."""
    import asyncio

    from cadenza.models.velocity.features import LiveVelocityFeatures
    from cadenza.models.velocity.worker import VelocityWorker

    rng = np.random.default_rng(3)
    events = [
        (int(rng.integers(0, 4)), 0.05 * k, int(p))
        for k in range(60)
        for p in rng.choice(np.arange(40, 90), int(rng.choice([1, 3])), replace=False)
    ]
    ref = load_causal_step()
    feats = {s: LiveVelocityFeatures() for s in range(4)}
    states = {s: ref.initial_state(1) for s in range(4)}
    want = []
    for s, t, p in events:
        v, states[s] = ref.step(feats[s].note_on(t, p)[None], states[s])
        want.append(float(v[0]))

    async def run():
        worker = VelocityWorker(
            load_model=lambda: load_causal_step(static=True), make_features=LiveVelocityFeatures, max_batch=64, inline=False
        )
        worker.start(asyncio.get_running_loop())
        try:
            futs = [worker.note_on(s, t, p) for s, t, p in events[:90]]
            worker.flush()
            await asyncio.wait_for(asyncio.gather(*futs), 20)
            futs2 = [worker.note_on(s, t, p) for s, t, p in events[90:]]
            worker.flush()
            await asyncio.wait_for(asyncio.gather(*futs2), 20)
        finally:
            worker.stop()
        return [f.result() for f in futs + futs2], worker.stats

    got, stats = asyncio.run(run())
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert stats.max_batch > 1


# ---- phrase ----------------------------------------------------------------------------------


def _tiny(seed=0, styles=0) -> PhraseModel:
    torch.manual_seed(seed)
    return PhraseModel(PhraseConfig(block_size=96, n_layer=2, n_head=2, n_embd=32, n_styles=styles)).eval()


@pytest.mark.parametrize("styles", [0, 2])
def test_static_decode_logits_equal_the_full_forward(styles):
    model = _tiny(styles=styles)
    if styles:
        with torch.no_grad():
            model.wse.weight[1].normal_(0, 0.5)
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 80))
    dec = StaticDecoder(model, batch=3, style=styles - 1 if styles else 0)
    with torch.no_grad():
        full = model(x, style=1 if styles else None)[0]  # (T, vocab)
    parts = [dec.prefill(x[0, :30].tolist())]
    parts += [dec.step([int(x[0, i])] * 3).clone() for i in range(30, 80)]
    got = torch.stack(parts, 1)  # (3, 51, vocab): every row the same
    assert dec.cache.pos == 80
    for row in got:
        torch.testing.assert_close(row, full[29:], atol=1e-4, rtol=1e-4)


def test_static_decode_rows_are_independent():
    model = _tiny(1)
    dec = StaticDecoder(model, batch=2)
    ref = StaticDecoder(model, batch=1)
    dec.prefill([tk.BOS])
    ref.prefill([tk.BOS])
    toks = torch.randint(0, tk.VOCAB_SIZE, (20,)).tolist()
    for t in toks:
        both = dec.step([t, (t + 5) % tk.VOCAB_SIZE]).clone()
        torch.testing.assert_close(both[0], ref.step([t])[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds"):
        for _ in range(200):
            dec.step([0, 0])


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_phrase()


def _greedy(live: LivePhrase, n: int) -> tuple[list[torch.Tensor], list[int]]:
    logits, toks = [live._logits.clone()], []
    for _ in range(n):
        tok = int(torch.argmax(live._logits))
        toks.append(tok)
        live._push([tok], played=False)
        logits.append(live._logits.clone())
    return logits, toks


def test_live_phrase_static_path_gives_the_same_logits_and_greedy_tokens(shipped):
    eager = LivePhrase(shipped, max_context=256)
    static = LivePhrase(shipped, max_context=256, static=True)
    assert eager.decoder is None and static.decoder is not None
    for live in (eager, static):
        for i, p in enumerate((60, 64, 67, 72, 67, 64, 62, 59)):
            live.feed(0.25 * i, note_on(0, p, 70 + i))
            live.feed(0.25 * i + 0.2, note_off(0, p))
    torch.testing.assert_close(static._logits, eager._logits, atol=1e-4, rtol=1e-4)
    le, te = _greedy(eager, 40)
    ls, ts = _greedy(static, 40)
    assert ts == te
    torch.testing.assert_close(torch.stack(ls), torch.stack(le), atol=1e-3, rtol=1e-3)
    # a response through the static path answers like the eager one
    assert list(static.respond(start_t=3.0, seconds=2.0, seed=1)) == list(eager.respond(start_t=3.0, seconds=2.0, seed=1))


# ---- CUDA graphs (GPU only) --------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_graphed_velocity_step_equals_eager_on_cuda():
    model = load_causal(device="cuda")
    static = StaticVelocityStep(model)
    assert static.graphed, static.fallback_reason
    for sessions in (1, 5, 64):
        feats = _sessions(sessions, notes=20)
        np.testing.assert_allclose(_play(static, feats, "cuda"), _play(model, feats, "cuda"), atol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_graphed_phrase_decode_equals_eager_on_cuda():
    model = load_phrase(device="cuda")
    eager = LivePhrase(model, static=False)
    graphed = LivePhrase(model)
    assert graphed.decoder is not None and graphed.decoder.graphed, graphed.decoder.fallback_reason
    for live in (eager, graphed):
        for i, p in enumerate((60, 64, 67, 72)):
            live.feed(0.25 * i, note_on(0, p, 80))
            live.feed(0.25 * i + 0.2, note_off(0, p))
    le, te = _greedy(eager, 32)
    lg, tg = _greedy(graphed, 32)
    assert tg == te
    torch.testing.assert_close(torch.stack(lg), torch.stack(le), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="capture succeeds here")
def test_phrase_decoder_falls_back_to_eager_when_capture_fails(caplog):
    model = _tiny(2)
    with caplog.at_level(logging.WARNING):
        dec = StaticDecoder(model, graphs=True)
    assert not dec.graphed and dec.fallback_reason
    assert [r for r in caplog.records if "capture failed" in r.getMessage()]
    ref = StaticDecoder(model)
    torch.testing.assert_close(dec.prefill([tk.BOS, 5, 9]), ref.prefill([tk.BOS, 5, 9]))
    torch.testing.assert_close(dec.step([7]).clone(), ref.step([7]).clone())
