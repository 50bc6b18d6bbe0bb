"""Best-of-N answers and the key/register/pace guards (models/phrase/answer.py, relatedness.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadenza.messages import note_off, note_on
from cadenza.midifile import MidiFile, write_performance
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.answer import AnswerOptions, Pace
from cadenza.models.phrase.live import LivePhrase
from cadenza.models.phrase.model import load_phrase
from cadenza.models.phrase.relatedness import MAJOR_SCALE, Notes, estimate_key, keys_down_at_onsets, relatedness

CALL = (60, 64, 67, 72, 67, 64, 62, 65, 69, 71, 72, 67)  # C major, within 60-72


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_phrase()


def _answer(model, answer: AnswerOptions | None, *, seed: int = 3, seconds: float = 4.0, gap: float = 0.25) -> tuple[LivePhrase, list]:
    live = LivePhrase(model, answer=answer)
    for i, p in enumerate(CALL):
        live.feed(gap * i, note_on(0, p, 80))
        live.feed(gap * i + 0.8 * gap, note_off(0, p))
    out = list(live.respond(start_t=gap * len(CALL) + 0.5, seconds=seconds, temperature=1.0, top_p=0.95, seed=seed))
    return live, out


def _pitches(out) -> list[int]:
    return [m[1] for _, m in out if m[0] & 0xF0 == 0x90]


def test_a_new_context_shares_the_decoder_and_answers_as_a_fresh_one_would(shipped):
    """The engine keeps a context per session: one that another context's best-of-N has just used
    the shared decoder of answers exactly as a context of its own would."""
    opts = AnswerOptions(best_of=4, lookahead_s=1.0, lookahead_tokens=24, first_tokens=12)
    first, _ = _answer(shipped, opts, seed=5)
    other = first.new_context()
    assert other._bank is first._bank and other._bank.decoder is not None and other.cache is not first.cache
    assert other.context_tokens == 1  # BOS only: nothing of the first context's
    for i, p in enumerate(CALL):
        other.feed(0.25 * i, note_on(0, p, 80))
        other.feed(0.25 * i + 0.2, note_off(0, p))
    out = list(other.respond(start_t=3.5, seconds=4.0, temperature=1.0, top_p=0.95, seed=3))
    _, fresh = _answer(shipped, opts)
    assert out == fresh and _pitches(out)


def test_best_of_n_keeps_the_highest_scoring_candidate(shipped):
    live, out = _answer(shipped, AnswerOptions(best_of=4, lookahead_s=1.0, lookahead_tokens=24, first_tokens=12))
    assert live.choices, "no best-of-N decision was made"
    for c in live.choices:
        assert len(c.scores) == 4
        assert all(c.scores[c.chosen] >= s for s in c.scores)
    # the answer really is the kept candidate: its first horizon's tokens follow the prompt
    first = live.choices[0]
    kept = first.tokens[first.chosen]
    start, hist = live._resp["start"], live.hist
    at = next(i for i in range(start, len(hist)) if hist[i : i + len(kept)] == kept)
    assert kept and all(tk.SHIFT0 <= t < tk.VEL0 for t in hist[start:at])  # only the silence before it
    ons = [m for _, m in out if m[0] & 0xF0 == 0x90]
    offs = [m for _, m in out if m[0] & 0xF0 == 0x80]
    assert ons and sorted(m[1] for m in ons) == sorted(m[1] for m in offs)  # every note released


def test_best_of_n_is_reproducible_with_a_seed(shipped):
    opts = AnswerOptions(best_of=3, lookahead_tokens=16, first_tokens=8)
    assert _answer(shipped, opts)[1] == _answer(shipped, opts)[1]


def test_guards_off_and_best_of_one_sample_as_before(shipped):
    _, plain = _answer(shipped, None)
    _, off = _answer(shipped, AnswerOptions(best_of=1, key_guard=0.0, register_guard=0.0))
    assert plain == off and _pitches(plain)


def test_guards_keep_the_answer_in_key_and_register(shipped):
    free = np.concatenate([_pitches(_answer(shipped, None, seed=s)[1]) for s in range(3)])
    guarded = np.concatenate(
        [_pitches(_answer(shipped, AnswerOptions(key_guard=20.0, register_guard=20.0, register_margin=0.0), seed=s)[1]) for s in range(3)]
    )
    tonic, major = estimate_key(np.asarray(CALL))
    assert (tonic, major) == (0, True)
    scale = set((tonic + MAJOR_SCALE) % 12)
    assert len(guarded) > 0
    assert all(p % 12 in scale for p in guarded)
    assert guarded.min() >= 60 - 1 and guarded.max() <= 72 + 1  # 20 nats per octave: a semitone out costs 1.7
    assert not (all(p % 12 in scale for p in free) and free.min() >= 59 and free.max() <= 73)  # the guards changed something


def test_relatedness_of_a_phrase_with_itself_and_with_another():
    on = np.arange(8) * 0.25
    call = Notes(on, np.array([60, 62, 64, 65, 67, 69, 71, 72]), 2.0, np.full(8, 64.0), keys_down_at_onsets(on, on + 0.2))
    same = relatedness(call, call)
    assert same == {"pc_corr": pytest.approx(1.0), "register": 0.0, "density": 0.0, "ioi": 0.0, "velocity": 0.0, "polyphony": 0.0}
    chords = np.repeat(on[:2] * 4, 2)  # two two-note chords, a second apart, loud
    far = relatedness(call, Notes(chords, np.array([85, 88, 90, 93]), 2.0, np.full(4, 96.0), keys_down_at_onsets(chords, chords + 0.5)))
    assert far["pc_corr"] < 0.5 and far["register"] > 20 and far["density"] == pytest.approx(1.0)
    assert (
        far["ioi"] == pytest.approx(2.0) and far["velocity"] == 32.0 and far["polyphony"] == pytest.approx(1.0)
    )  # 2 keys down at each onset against 1
    assert relatedness(Notes(on, call.pitch, 2.0), call)["velocity"] is None  # unknown on one side
    assert relatedness(call, Notes(np.zeros(0), np.zeros(0), 2.0))["pc_corr"] is None


def test_continue_file_with_best_of_n(tmp_path):
    rng = np.random.default_rng(0)
    on = np.arange(16) * 0.25
    from cadenza.midifile import Performance

    perf = Performance(on, on + 0.2, rng.choice(CALL, 16).astype(np.int16), np.full(16, 80, np.int16), np.zeros(16, np.int8))
    write_performance(perf, tmp_path / "in.mid")
    from cadenza.models.phrase.files import continue_file

    n = continue_file(
        tmp_path / "in.mid",
        tmp_path / "out.mid",
        seconds=3.0,
        temperature=1.0,
        top_k=0,
        top_p=0.95,
        seed=0,
        answer=AnswerOptions(best_of=3, lookahead_tokens=16, first_tokens=8),
    )
    both = MidiFile.load(tmp_path / "out.mid").performance
    assert n > 0 and len(both) == 16 + n


def test_paced_answers_compare_only_what_time_allows(shipped):
    """Live (paced), a horizon gets no more tokens than half the music generated ahead of
    playback takes to compute: with a step estimated as very slow nothing is compared and the
    answer is sampled onset by onset; offline the same options compare candidates."""
    opts = AnswerOptions(best_of=4, lookahead_tokens=24)
    live = LivePhrase(shipped, answer=opts, paced=True)
    live._step_s = 1e9
    for i, p in enumerate(CALL):
        live.feed(0.25 * i, note_on(0, p, 80))
        live.feed(0.25 * i + 0.2, note_off(0, p))
    paced = list(live.respond(start_t=3.5, seconds=3.0, seed=1))
    assert live.choices == [] and _pitches(paced)
    offline, _ = _answer(shipped, opts, seed=1, seconds=3.0)
    assert offline.choices and all(len(c.tokens[c.chosen]) <= 24 for c in offline.choices)


def test_temperature_and_nucleus_shape_the_keys_not_the_rhythm():
    """The sampler sharpens which key is struck and leaves the odds of every other kind of token
    (release, time shift, velocity, pedal) and of striking at all as the model gives them."""
    from cadenza.models.phrase.answer import KEYS, sampling_probs

    torch.manual_seed(0)
    logits = torch.randn(3, tk.VOCAB_SIZE) * 2
    logits[2, KEYS] = -float("inf")  # a row whose grammar allows no key
    model = torch.softmax(logits, -1)
    torch.testing.assert_close(sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0), model)
    p = sampling_probs(logits, temperature=0.5, top_k=0, top_p=0.8)
    assert not p.isnan().any()
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    rest = torch.ones(tk.VOCAB_SIZE, dtype=torch.bool)
    rest[KEYS] = False
    torch.testing.assert_close(p[:, rest], model[:, rest])  # releases, shifts, velocities, pedal untouched
    torch.testing.assert_close(p[:, KEYS].sum(-1), model[:, KEYS].sum(-1))  # striking a key: as likely as before
    on, on_model = p[0, KEYS], model[0, KEYS]
    assert (on > 0).sum() < (on_model > 0).sum()  # the nucleus dropped the unlikely keys
    assert on.max() / on.sum() > on_model.max() / on_model.sum()  # and the temperature sharpened the rest
    assert sampling_probs(logits, temperature=1.0, top_k=5, top_p=1.0)[0, KEYS].gt(0).sum() == 5


def test_pace_bias_holds_back_an_answer_ahead_of_the_call_and_urges_one_behind():
    call = Notes(np.arange(10) * 0.5, np.full(10, 60), 5.0)  # 2 notes per second
    pace = Pace.of(call, 3.0, tk.QUANTUM_S)
    second = int(round(1 / tk.QUANTUM_S))
    assert pace.bias(0, 0) == 0.0
    assert pace.bias(2, second) == pytest.approx(0.0)  # on the call's pace
    assert pace.bias(10, second) < pace.bias(4, second) < 0 < pace.bias(0, 3 * second)
    assert pace.bias(10_000, second) == pytest.approx(-6.0)  # clipped: a soft guard, never a wall
    assert Pace.of(call, 0.0, tk.QUANTUM_S) is None and Pace.of(Notes(np.zeros(1), np.full(1, 60), 1.0), 3.0, tk.QUANTUM_S) is None


def test_pace_guard_brings_a_runaway_answer_back_to_the_calls_pace(shipped):
    """Against a slow call (a note a second) the model left to itself often runs ahead; the guard
    (which biases the VELOCITY token too: after one, the NOTE_ON is all but certain) holds it near."""

    def rate(opts, seed):
        return len(_pitches(_answer(shipped, opts, seed=seed, seconds=6.0, gap=1.0)[1])) / 6.0

    free = np.mean([rate(None, s) for s in range(8)])
    guarded = np.mean([rate(AnswerOptions(pace_guard=6.0), s) for s in range(8)])
    assert free > 2.0  # the unguarded answers are much busier than the call
    assert abs(np.log(guarded)) < 0.5 * abs(np.log(free))
