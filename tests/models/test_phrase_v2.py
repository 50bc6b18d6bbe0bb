"""The second phrase architecture: rotary positions with a sliding (ring) KV cache, SwiGLU,
resumable training, and the LSTM baseline, each through the live path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadenza.messages import note_off, note_on
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.live import LivePhrase
from cadenza.models.phrase.model import WEIGHTS_DIR, PhraseConfig, PhraseModel, load_phrase
from cadenza.models.phrase.static import StaticDecoder


def _rope(seed=0, *, layers=2, block=32, mlp="swiglu", styles=0) -> PhraseModel:
    torch.manual_seed(seed)
    cfg = PhraseConfig(block_size=block, n_layer=layers, n_head=2, n_embd=32, pos="rope", mlp=mlp, n_styles=styles)
    return PhraseModel(cfg).eval()


@pytest.mark.parametrize("static", [False, True])
def test_rope_cache_within_the_block_equals_the_full_forward(static):
    model = _rope()
    x = torch.randint(0, tk.VOCAB_SIZE, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch=2, static=static)
        parts = [model(x[:, :11], cache)] + [model(x[:, i : i + 1], cache) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_sliding_cache_equals_band_attention_past_the_block(static):
    """Far past block_size, one token at a time (and in chunks longer than the ring): the ring
    cache gives the logits of a full forward with sliding-window attention, never re-encoding."""
    model = _rope(1, layers=3)
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 150))  # ~5 blocks
    with torch.no_grad():
        full = model(x)[0]  # T > block_size: band mask of width block_size
        cache = model.new_cache(static=static)
        parts = [model(x[:, :40], cache)[0]]  # a prefill longer than the ring
        parts += [model(x[:, i : i + 1], cache)[0] for i in range(40, 120)]
        parts += [model(x[:, 120:150], cache)[0]]  # a chunk after wrapping
    assert cache.pos == 150 and cache.free > 10**9
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-4, rtol=1e-4)


def test_one_layer_sliding_cache_equals_a_full_forward_on_the_last_block():
    """With one layer nothing older than the window reaches the last token, so the slid cache's
    logits equal a plain forward on the last block_size tokens (positions renumbered from 0)."""
    model = _rope(2, layers=1)
    W = model.config.block_size
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 3 * W + 5))
    with torch.no_grad():
        cache = model.new_cache()
        model(x[:, :W], cache)
        for i in range(W, x.size(1) - 1):
            model(x[:, i : i + 1], cache)
        last = model(x[:, -1:], cache)[0, -1]
        block = model(x[:, -W:])[0, -1]
    torch.testing.assert_close(last, block, atol=1e-5, rtol=1e-4)


def test_rewind_after_wrapping_masks_the_lost_slots():
    """A rewind in a wrapped ring forgets the slots the dropped tokens overwrote: the next steps
    equal a band forward in which those positions are missing (not a stale key)."""
    model = _rope(3)
    W = model.config.block_size
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 2 * W))
    with torch.no_grad():
        cache = model.new_cache()
        model(x[:, : W + 10], cache)
        model(x[:, W + 10 : W + 15], cache)  # 5 tokens that will be taken back
        cache.rewind(5)
        assert not cache.contiguous
        got = torch.cat([model(x[:, i : i + 1], cache)[0] for i in range(W + 10, W + 20)])
        ref_cache = model.new_cache(static=True)  # the masked path throughout
        model(x[:, : W + 10], ref_cache)
        ref_cache.slot_pos.masked_fill_((ref_cache.slot_pos >= W + 10 - W) & (ref_cache.slot_pos < W + 15 - W), -1)
        want = torch.cat([model(x[:, i : i + 1], ref_cache)[0] for i in range(W + 10, W + 20)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert cache.contiguous


@pytest.mark.parametrize("styles", [0, 2])
def test_static_decoder_slides_a_rope_cache(styles):
    model = _rope(4, styles=styles)
    if styles:
        with torch.no_grad():
            model.wse.weight[1].normal_(0, 0.5)
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 100))
    dec = StaticDecoder(model, batch=2, style=1 if styles else 0)
    with torch.no_grad():
        full = model(x, style=1 if styles else None)[0]
    parts = [dec.prefill(x[0, :20].tolist())] + [dec.step([int(x[0, i])] * 2).clone() for i in range(20, 100)]
    got = torch.stack(parts, 1)
    for row in got:
        torch.testing.assert_close(row, full[19:], atol=1e-4, rtol=1e-4)


def test_shipped_absolute_weights_still_load_and_generate():
    model = load_phrase(WEIGHTS_DIR / "phrase.safetensors")  # the first model, absolute positions
    assert model.config.pos == "absolute" and model.wpe is not None
    live = LivePhrase(model)
    for i, p in enumerate((60, 64, 67, 72)):
        live.feed(0.25 * i, note_on(0, p, 80))
        live.feed(0.25 * i + 0.2, note_off(0, p))
    out = list(live.respond(start_t=1.5, seconds=3.0, seed=0))
    assert any(m[0] & 0xF0 == 0x90 for _, m in out)


def test_rope_weights_round_trip(tmp_path):
    model = _rope(5)
    model.save(tmp_path / "r.safetensors")
    again = load_phrase(tmp_path / "r.safetensors")
    assert again.config.pos == "rope" and again.config.mlp == "swiglu" and again.wpe is None
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


# ---- training: resume ------------------------------------------------------------------------


def _tiny_data(pop: bool = False):

    from cadenza.models.phrase.data import TokenSplit
    from cadenza.models.phrase.train import Data

    rng = np.random.default_rng(0)
    pieces = [np.concatenate([[tk.BOS], rng.integers(1, tk.VOCAB_SIZE, 300)]).astype(np.uint16) for _ in range(6)]
    split = TokenSplit(np.concatenate(pieces), np.arange(6) * 301, np.full(6, 10.0), [f"p{i}" for i in range(6)])
    val = np.stack([p[:33].astype(np.int64) for p in pieces[:4]])
    return Data(split, val, split if pop else None, val if pop else None)


def _opts(tmp_path, **kw):
    from cadenza.models.phrase.train import TrainOptions

    base = dict(
        batch=4,
        seq_len=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        lr=3e-3,
        warmup_steps=3,
        tokens=4 * 32 * 12,
        eval_every_s=0.0,
        checkpoint_every_s=3600.0,
        minutes=5.0,
        out=tmp_path / "w.safetensors",
        checkpoint=tmp_path / "w.ckpt",
    )
    return TrainOptions(**{**base, **kw})


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_resume_continues_the_run_exactly(tmp_path, arch):
    """Stopped after 5 steps and resumed, a run ends with the weights, optimizer state and loss
    curve of the same run never stopped: the optimizer moments and the data position come back."""
    import json

    from cadenza.models.phrase.train import fit

    torch.set_num_threads(1)
    whole = fit(_opts(tmp_path / "a", arch=arch, pop909=0.25), _tiny_data(pop=True), progress=False)
    first = fit(_opts(tmp_path / "b", arch=arch, pop909=0.25, steps=5), _tiny_data(pop=True), progress=False)
    assert first["stopped"] == "steps" and first["steps"] == 5
    rest = fit(_opts(tmp_path / "b", arch=arch, pop909=0.25, resume=True), _tiny_data(pop=True), progress=False)
    assert whole["stopped"] == rest["stopped"] == "tokens" and rest["steps"] == whole["steps"] == 12
    assert [h["val_nll"] for h in rest["history"]] == pytest.approx([h["val_nll"] for h in whole["history"]], rel=1e-4)
    a = torch.load(tmp_path / "a" / "w.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "w.ckpt", weights_only=True)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=1e-4)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], atol=1e-7, rtol=1e-3)
    meta = json.loads((tmp_path / "b" / "w.json").read_text())
    runs = meta["training"]["runs"]
    assert [(r["step_start"], r["step_end"], r["stopped"]) for r in runs] == [(0, 5, "steps"), (5, 12, "tokens")]
    assert runs[1]["tokens_end"] == 12 * 4 * 32 and runs[1]["history"]
    assert load_phrase(tmp_path / "b" / "w.safetensors").config.n_styles == 2


def test_adapt_converts_and_grows_without_changing_what_it_keeps():
    from cadenza.models.phrase.train import adapt

    torch.manual_seed(0)
    small = PhraseModel(PhraseConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    deeper = adapt(small, pos=None, n_layer=3).eval()  # a new block that starts as the identity
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(deeper(x), small(x))
    rope = adapt(small, pos="rope", n_layer=2)
    assert rope.wpe is None and rope.config.pos == "rope"
    torch.testing.assert_close(rope.h[0].attn.c_attn.weight, small.h[0].attn.c_attn.weight)


# ---- the LSTM baseline -----------------------------------------------------------------------


def _lstm(seed=0, styles=0):
    from cadenza.models.phrase.lstm import LSTMConfig, PhraseLSTM

    torch.manual_seed(seed)
    return PhraseLSTM(LSTMConfig(block_size=32, n_layer=3, n_embd=24, n_styles=styles)).eval()


def test_lstm_shapes_and_state_equal_the_full_forward():
    model = _lstm()
    x = torch.randint(0, tk.VOCAB_SIZE, (2, 50))
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, 50, tk.VOCAB_SIZE)
        state = model.new_cache(batch=2)
        parts = [model(x[:, :20], state)] + [model(x[:, i : i + 1], state) for i in range(20, 50)]
        assert model(x[:, :5], last_only=True).shape == (2, 1, tk.VOCAB_SIZE)
    assert state.pos == 50 and state.free > 10**9
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_lstm_state_rewinds_one_token_steps():
    model = _lstm(1)
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 30))
    with torch.no_grad():
        state = model.new_cache()
        model(x[:, :10], state)
        for i in range(10, 30):
            model(x[:, i : i + 1], state)
        assert state.can_rewind(19) and not state.can_rewind(25)  # a chunk's interior is not kept
        state.rewind(8)
        again = model(x[:, 22:23], state)
        want = model(x[:, :23])[:, -1:]
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-4)


def test_scoring_windows_move_on_for_a_short_context():
    """A model trained on windows no longer than the scoring overlap (the LSTM, 128 tokens) is
    scored in windows that still advance: every token once, the first window's from a zero state."""
    from cadenza.models.phrase.evaluate import OVERLAP, model_log_probs

    model = _lstm(3)  # block_size 32 < OVERLAP
    assert model.config.block_size < OVERLAP
    piece = np.random.default_rng(0).integers(0, tk.VOCAB_SIZE, 100)
    lp = model_log_probs(model, piece)
    assert lp.shape == (99,) and np.all(lp < 0)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.from_numpy(piece[:32])[None]), -1)[0, :-1]
    np.testing.assert_allclose(lp[:31], first.gather(1, torch.from_numpy(piece[1:32])[:, None])[:, 0].numpy(), rtol=1e-4)
    wide = model_log_probs(model, piece, window=512)  # the transformer's windows: one pass here
    with torch.no_grad():
        full = torch.log_softmax(model(torch.from_numpy(piece)[None]), -1)[0, :-1]
    np.testing.assert_allclose(wide, full.gather(1, torch.from_numpy(piece[1:])[:, None])[:, 0].numpy(), rtol=1e-4)


@pytest.mark.parametrize("which", ["lstm", "rope"])
def test_live_phrase_drives_both_new_models(which, tmp_path):
    """Feed, respond (balanced MIDI), barge in (the response is cut and rewound), and go on
    past the context length without a re-prefill: the live path, through the loaded weights."""
    model = _lstm(2, styles=2) if which == "lstm" else _rope(6, block=64, styles=2)
    model.save(tmp_path / "m.safetensors")
    model = load_phrase(tmp_path / "m.safetensors")
    live = LivePhrase(model, style="pop")
    t = 0.0
    for i in range(40):  # ~120 tokens: past the 32/64-token context
        live.feed(t, note_on(0, 48 + i % 24, 60 + i % 40))
        live.feed(t + 0.1, note_off(0, 48 + i % 24))
        t += 0.15
    assert live.context_tokens == len(live.hist) > model.config.block_size  # slid, never re-prefilled
    ev = list(live.respond(start_t=t + 0.5, seconds=3.0, seed=1, top_p=0.95))
    on = [m for _, m in ev if m[0] & 0xF0 == 0x90]
    off = [m for _, m in ev if m[0] & 0xF0 == 0x80]
    assert sorted(m[1] for m in on) == sorted(m[1] for m in off)
    resp = live.respond(start_t=t + 5.0, seconds=4.0, seed=2)
    first = [next(resp) for _ in range(3)]
    resp.close()
    n = live.context_tokens
    live.feed(first[0][0] + 0.01, note_on(0, 60, 80))  # barge in: the unheard tail is taken back
    assert live.context_tokens <= n + 4
    tail = list(live.respond(start_t=first[0][0] + 1.0, seconds=2.0, seed=3))
    assert sorted(m[1] for _, m in tail if m[0] & 0xF0 == 0x90) == sorted(m[1] for _, m in tail if m[0] & 0xF0 == 0x80)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_rope_decoder_slides_like_the_eager_one_on_cuda():
    model = _rope(7, block=64).cuda()
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 200), device="cuda")
    with torch.no_grad():
        full = model(x)[0]  # band attention: what the ring gives
    dec = StaticDecoder(model)
    assert dec.graphed, dec.fallback_reason
    parts = [dec.prefill(x[0, :10].tolist())] + [dec.step([int(x[0, i])]).clone() for i in range(10, 200)]
    torch.testing.assert_close(torch.cat(parts), full[9:], atol=1e-3, rtol=1e-3)


def test_an_answer_ends_even_when_the_model_never_moves_the_clock():
    """A model that only ever wants velocity changes (they take no time) once kept an answer going
    forever; after MAX_STILL_TOKENS tokens at one tick the answer must move its clock."""
    from cadenza.models.phrase.answer import MAX_STILL_TOKENS

    model = _lstm(4)
    with torch.no_grad():
        model.lm_head.bias[tk.VEL0 : tk.SUSTAIN_ON] += 50.0  # velocity tokens win every draw they may
    live = LivePhrase(model)
    for i, p in enumerate((60, 64, 67)):
        live.feed(0.3 * i, note_on(0, p, 80))
        live.feed(0.3 * i + 0.2, note_off(0, p))
    out = list(live.respond(start_t=1.0, seconds=2.0, seed=0))  # returns (it used to loop)
    assert not any(m[0] & 0xF0 == 0x90 for _, m in out)  # nothing but velocities and shifts was drawn
    runs, n = [], 0
    for t in live.hist:
        n = 0 if tk.SHIFT0 <= t < tk.VEL0 else n + 1
        runs.append(n)
    assert max(runs) <= MAX_STILL_TOKENS + 8  # the prompt's own runs are short; the answer's are capped
