"""The phrase model: KV cache == full forward, weights I/O, live call and response, file commands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadenza.errors import MidiFileError, ModelError
from cadenza.midifile import MidiFile, Performance, write_performance
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.live import LivePhrase
from cadenza.models.phrase.model import PhraseConfig, PhraseModel, load_phrase


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_phrase()


def _tiny(seed=0) -> PhraseModel:
    torch.manual_seed(seed)
    return PhraseModel(PhraseConfig(block_size=96, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.mark.parametrize("static", [False, True])
def test_cached_logits_equal_full_forward(static):
    model = _tiny()
    x = torch.randint(0, tk.VOCAB_SIZE, (2, 90))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch=2, static=static)
        parts = [model(x[:, :37], cache)]  # a prefill chunk, then one token at a time
        parts += [model(x[:, i : i + 1], cache) for i in range(37, 90)]
    assert cache.pos == 90
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_style_vectors_condition_every_position_and_survive_the_cache(tmp_path):
    from cadenza.errors import ConfigError
    from cadenza.models.phrase.model import with_styles

    plain = _tiny(2)
    styled = with_styles(plain, 2)  # new style vectors start at zero: the same model
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(styled(x, style=1), plain(x))
        styled.wse.weight[1].normal_(0, 0.5)
        assert not torch.allclose(styled(x, style=1), styled(x, style=0))
        torch.testing.assert_close(styled(x, style=0), plain(x))
        cache = styled.new_cache()
        parts = [styled(x[:, :10], cache, style=1)] + [styled(x[:, i : i + 1], cache, style=1) for i in range(10, 40)]
        torch.testing.assert_close(torch.cat(parts, 1), styled(x, style=1), atol=1e-5, rtol=1e-4)
    styled.save(tmp_path / "s.safetensors")
    again = load_phrase(tmp_path / "s.safetensors")
    assert again.config.n_styles == 2
    with torch.no_grad():
        torch.testing.assert_close(again(x, style=1), styled(x, style=1))
    with pytest.raises(ConfigError, match="no style 'pop'"):
        LivePhrase(plain, style="pop")  # weights trained without styles
    with pytest.raises(ConfigError, match="unknown style"):
        LivePhrase(styled, style="jazz")


def test_context_overflow_is_refused():
    model = _tiny()
    cache = model.new_cache(max_len=10)
    with torch.no_grad(), pytest.raises(ValueError):
        model(torch.zeros(1, 11, dtype=torch.long), cache)


def test_weights_round_trip_and_bad_weights(tmp_path):
    model = _tiny(1)
    model.save(tmp_path / "p.safetensors", extra={"note": "test"})
    again = load_phrase(tmp_path / "p.safetensors")
    x = torch.randint(0, tk.VOCAB_SIZE, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    assert again.lm_head.weight.data_ptr() == again.wte.weight.data_ptr()  # tie survives loading
    (tmp_path / "p.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError):
        load_phrase(tmp_path / "p.safetensors")
    with pytest.raises(ModelError):
        load_phrase(tmp_path / "missing.safetensors")


def test_shipped_weights_fit_the_limits():
    from cadenza.models.phrase.model import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS.stat().st_size <= 16 * 2**20
    assert load_phrase().num_params() <= 16_000_000


def _phrase(live: LivePhrase, t: float = 0.0) -> float:
    for p in [60, 64, 67, 72, 67, 64, 60, 55]:
        live.feed(t, bytes([0x90, p, 80]))
        live.feed(t + 0.2, bytes([0x80, p, 0]))
        t += 0.25
    live.feed(t, bytes([0xC0, 5, 0]))  # program change: ignored
    return t


def _check_balanced(events, start_t):
    times = [t for t, _ in events]
    assert times == sorted(times) and times[0] >= start_t - 1e-9
    sounding: set[int] = set()
    pedal = False
    for _, m in events:
        assert len(m) == 3 and m[0] & 0x80 and m[1] < 128 and m[2] < 128
        if m[0] & 0xF0 == 0x90:
            assert m[2] > 0 and m[1] not in sounding
            sounding.add(m[1])
        elif m[0] & 0xF0 == 0x80:
            assert m[1] in sounding
            sounding.discard(m[1])
        else:
            assert m[0] & 0xF0 == 0xB0 and m[1] == 64
            pedal = m[2] >= 64
    assert not sounding and not pedal


def test_feed_and_respond_give_balanced_midi(shipped):
    live = LivePhrase(shipped)
    end = _phrase(live)
    assert live.context_tokens > 16  # already in the cache: nothing left to prefill
    start = end + 0.6
    ev = list(live.respond(start_t=start, seconds=4.0, temperature=1.0, top_k=0, top_p=0.95, seed=3))
    assert any(m[0] & 0xF0 == 0x90 for _, m in ev)
    _check_balanced(ev, start)
    assert ev[-1][0] <= start + 4.0 + 1e-9
    again = LivePhrase(shipped)
    _phrase(again)
    assert list(again.respond(start_t=start, seconds=4.0, temperature=1.0, top_k=0, top_p=0.95, seed=3)) == ev  # seeded


def test_warm_up_leaves_no_trace(shipped):
    warmed = LivePhrase(shipped)
    assert warmed.warm_up() > 0  # it did answer its scratch phrase
    assert warmed.context_tokens == 1 and warmed.hist == [warmed.hist[0]]  # back to BOS alone
    fresh = LivePhrase(shipped)
    answers = []
    for live in (warmed, fresh):
        end = _phrase(live)
        answers.append(list(live.respond(start_t=end + 0.6, seconds=2.0, temperature=1.0, top_p=0.95, seed=5)))
    assert answers[0] == answers[1]


def test_early_close_leaves_a_consistent_context(shipped):
    live = LivePhrase(shipped, max_context=200)  # small: sliding happens too
    t = _phrase(live)
    for round_ in range(3):
        gen = live.respond(start_t=t + 0.6, seconds=6.0, temperature=1.0, top_k=20, top_p=1.0, seed=round_)
        got = [next(gen) for _ in range(3)]
        gen.close()  # barge-in: the engine releases what it sent
        barge = got[-1][0] + 0.05
        live.feed(barge, bytes([0x90, 62, 90]))
        # the response's notes are closed in the context, the performer's is the only one sounding
        assert live.stream.sounding == {62}
        assert live.stream.tick == live.stream.tick_of(barge)
        live.feed(barge + 0.3, bytes([0x80, 62, 0]))
        t = barge + 0.3
        # the context decodes: every generated note in it is balanced
        assert len(live.hist) >= live.context_tokens
    ev = list(live.respond(start_t=t + 0.6, seconds=3.0, temperature=1.0, top_k=0, top_p=0.95, seed=9))
    _check_balanced(ev, t + 0.6)
    # closed early, then answered again at once (no feed between): the new answer replaces the
    # unheard rest of the old one in the context
    gen = live.respond(start_t=t + 5.0, seconds=6.0, temperature=1.0, top_k=20, top_p=1.0, seed=4)
    got = [next(gen) for _ in range(4)]
    gen.close()
    again = got[-1][0] + 0.02
    ev = list(live.respond(start_t=again, seconds=2.0, temperature=1.0, top_k=0, top_p=0.95, seed=5))
    _check_balanced(ev, again)
    assert live.stream.sounding == set()
    if ev:
        assert live.stream.tick == live.stream.tick_of(ev[-1][0])  # the context is where the answer ended
    # a stale generator stops once the context has moved on
    gen = live.respond(start_t=t + 5, seconds=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=1)
    live.feed(t + 4.0, bytes([0x90, 40, 70]))
    assert list(gen) == []


def test_unconditioned_generation_writes_valid_midi(tmp_path):
    from cadenza.models.phrase.files import generate_file

    out = tmp_path / "gen.mid"
    n = generate_file(out, seconds=4.0, temperature=1.0, top_k=0, top_p=0.95, seed=0)
    perf = MidiFile.load(out).performance
    assert n == len(perf) > 0
    assert perf.end <= 4.0 + 0.02 and np.all(perf.offset >= perf.onset)


def test_continue_keeps_the_input_and_appends(tmp_path):
    from cadenza.models.phrase.files import continue_file

    rng = np.random.default_rng(1)
    on = np.arange(24) * 0.25
    perf = Performance(on, on + 0.2, rng.integers(55, 80, 24).astype(np.int16), np.full(24, 70, np.int16), np.zeros(24, np.int8))
    write_performance(perf, tmp_path / "in.mid")
    src = (tmp_path / "in.mid").read_bytes()
    n = continue_file(tmp_path / "in.mid", tmp_path / "out.mid", seconds=3.0, temperature=1.0, top_k=0, top_p=0.95, seed=0)
    out = (tmp_path / "out.mid").read_bytes()
    assert out[14 : len(src)] == src[14:]  # every original track byte kept
    assert int.from_bytes(out[10:12], "big") == int.from_bytes(src[10:12], "big") + 1
    both = MidiFile.load(tmp_path / "out.mid").performance
    assert len(both) == len(perf) + n and n > 0
    new = both.onset >= perf.offset.max() - 1e-6
    assert new.sum() >= n and both.offset.max() <= perf.offset.max() + 3.0 + 0.02


def test_corrupt_input_gives_one_line_error_and_no_output(tmp_path):
    from cadenza.cli import main

    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0MTrk\x00\x00\x01\x00\x00\x90")
    with pytest.raises(MidiFileError):
        from cadenza.models.phrase.files import continue_file

        continue_file(bad, tmp_path / "o.mid", seconds=2, temperature=1, top_k=0, top_p=1, seed=0)
    assert main(["continue", str(bad), "-o", str(tmp_path / "o.mid"), "--seconds", "2"]) == 2
    assert main(["generate", "-o", str(tmp_path / "g.mid"), "--seconds", "-1"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mid"]


@pytest.mark.parametrize("flags", [["--temperature", "0"], ["--top-p", "2"], ["--top-k", "-1"]])
def test_bad_sampling_flags_are_one_line(tmp_path, capsys, flags):
    from cadenza.cli import main

    assert main(["generate", "-o", str(tmp_path / "g.mid"), "--seconds", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid config value phrase." in err[0]
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, capsys):
    from cadenza.cli import main

    (tmp_path / "taken.mid").mkdir()  # the output name is a folder
    assert main(["generate", "-o", str(tmp_path / "taken.mid"), "--seconds", "1", "--seed", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "taken.mid" in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["taken.mid"] and list((tmp_path / "taken.mid").iterdir()) == []


def test_bench_cached_and_naive_generate_the_same_tokens():
    from cadenza.models.phrase.bench import _cached, _naive, synthetic_prompt

    model = _tiny(2)
    prompt = synthetic_prompt(40)
    assert len(prompt) == 40 and prompt[0] == tk.BOS
    _, slides, a = _cached(model, prompt, 30, torch.Generator().manual_seed(5))
    _, b = _naive(model, prompt, 30, torch.Generator().manual_seed(5))
    assert slides == 0 and a == b  # the cache changes the speed, not the result
    _, slides, _ = _cached(model, prompt, 80, torch.Generator().manual_seed(5))
    assert slides >= 1  # 40 + 80 > block 96: the cache slid and generation went on


def test_guard_rails_limit_hold_time_and_voices(shipped):
    live = LivePhrase(shipped)
    start = _phrase(live) + 0.6
    ev = list(live.respond(start_t=start, seconds=6.0, temperature=1.2, top_k=0, top_p=1.0, seed=2, max_hold_s=0.3, max_voices=2))
    _check_balanced(ev, start)
    down: dict[int, float] = {}
    for t, m in ev:
        if m[0] & 0xF0 == 0x90:
            down[m[1]] = t
            assert len(down) <= 2
        elif m[0] & 0xF0 == 0x80:
            assert t - down.pop(m[1]) <= 0.3 + 1e-6


def test_shipped_weights_answer_in_both_styles(tmp_path):
    from cadenza.cli import main

    assert load_phrase().config.n_styles == 2
    outs = {}
    for style in ("classical", "pop"):
        out = tmp_path / f"{style}.mid"
        assert main(["generate", "-o", str(out), "--seconds", "3", "--seed", "4", "--style", style]) == 0
        perf = MidiFile.load(out).performance
        assert len(perf) > 0 and perf.end <= 3.0 + 0.02
        outs[style] = (perf.pitch.tolist(), perf.onset.round(2).tolist())
    assert outs["classical"] != outs["pop"]  # same seed, different style vector


@pytest.mark.maestro
def test_each_style_fits_its_own_music_best(settings, maestro_root, shipped):
    """On held-out songs, POP909 is likelier under the pop style and MAESTRO under the classical
    one: the style vector carries what the two corpora differ in."""
    from cadenza.models.phrase.data import load_pop909, load_split
    from cadenza.models.phrase.evaluate import model_log_probs

    try:
        pop = load_pop909(settings.data.pop909, "test", progress=False)
    except Exception as exc:  # noqa: BLE001  (data not there)
        pytest.skip(f"POP909 not available: {exc}")
    classical = load_split(maestro_root, "test", limit=3, progress=False)
    for ts, own in ((pop, 1), (classical, 0)):
        for i in range(3):
            piece = ts.piece(i)[:2048]
            nll = [-model_log_probs(shipped, piece, style=s).mean() for s in (0, 1)]
            assert nll[own] < nll[1 - own], (ts.names[i], nll)
