"""The generation study of `cadenza eval phrase`: prompts, answers, and how they compare.

For each prompt (a random moment in a random piece of the split) every generator in a list
continues the preceding performance for ``seconds``. Each answer is compared

* with what the pianist really played next: overlap areas of the histograms of
  :data:`~cadenza.models.phrase.evaluate.STATS` (``generation_overlap``);
* with its own prompt (the last ``seconds`` before it): call-relatedness,
  :func:`~cadenza.models.phrase.relatedness.relatedness` (``call_relatedness``).

Generators are plain callables (:class:`Generator`): the transformer (through ``LivePhrase`` as
on stage, with the configured best-of-N and guards), the n-gram baseline, the real continuation,
and any other model that can continue a prompt (an LSTM, ...) is one more entry in the list.
The real *previous* ``seconds`` are scored against the real next ones as the reference row.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cadenza.midifile import Performance
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.relatedness import RELATEDNESS, Notes, keys_down_at_onsets, relatedness

if TYPE_CHECKING:
    from cadenza.models.phrase.live import LivePhrase
    from cadenza.models.phrase.ngram import NGram


class Sampling(Protocol):
    """Sampling settings (``PhraseSettings`` has them)."""

    temperature: float
    top_k: int
    top_p: float


NoteArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # onset, offset, pitch, velocity (absolute s)


@dataclass
class Prompt:
    real: Performance  # the whole piece
    t0: float  # the answer starts here (where the pianist's next note did)
    seconds: float
    msgs: list[tuple[float, bytes]]  # the performance before t0, as MIDI messages
    hist: list[int]  # ... as tokens, BOS first, the clock advanced to t0
    stream: tk.TokenStream  # the tokenizer state at t0 (copy before use)


Generator = Callable[[Prompt, np.random.Generator], NoteArrays]


@dataclass
class Named:
    name: str
    generate: Generator


@dataclass
class StudyResult:
    overlap: dict = field(default_factory=dict)
    relatedness: dict = field(default_factory=dict)
    answers: dict[str, list[Performance]] = field(default_factory=dict)  # per generator, in prompt order (for the report)


def make_prompt(real: Performance, t0: float, seconds: float) -> Prompt:
    """The performance before ``t0``, ending as a call does on stage: every key up. A phrase ends
    live only once no key is down (``[phrase]`` silence, or a bar line with no key down), and an
    answer may release only its own keys, so keys the pianist still held at ``t0`` (the prompt is
    cut at an onset) are released there; the pedal stays as it was."""
    from cadenza.messages import note_off
    from cadenza.models.phrase.files import performance_messages

    msgs = [(t, m) for t, m in performance_messages(real) if t < t0 - 1e-6]
    st = tk.TokenStream()
    hist = [tk.BOS]
    for t, m in msgs:
        ev = tk.message_event(m)
        hist += st.feed(t, *ev) if ev else []
    for k in sorted(st.sounding):
        msgs.append((t0, note_off(0, k)))
        hist += st.feed(t0, tk.OFF, k)
    hist += st.advance_to(st.tick_of(t0))
    return Prompt(real, t0, seconds, msgs, hist, st)


def real_next(p: Prompt, rng: np.random.Generator) -> NoteArrays:
    """The real continuation (the pianist's next ``seconds``)."""
    r = p.real
    return r.onset, r.offset, r.pitch.astype(np.float64), r.velocity.astype(np.float64)


def live_generator(live: LivePhrase, sampling: Sampling) -> Generator:
    """A ``LivePhrase`` fed the prompt and answering from t0, as on stage."""
    from cadenza.models.phrase.evaluate import _pair

    def gen(p: Prompt, rng: np.random.Generator) -> NoteArrays:
        live.reset()
        live.feed_many(p.msgs)
        out = list(
            live.respond(
                start_t=p.t0,
                seconds=p.seconds,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                seed=int(rng.integers(2**31)),
            )
        )
        return _pair(out, p.t0 + p.seconds)

    return gen


def ngram_generator(ng: NGram, temperature: float) -> Generator:
    from cadenza.models.phrase.evaluate import _events_to_notes, _ngram_continue

    def gen(p: Prompt, rng: np.random.Generator) -> NoteArrays:
        st = p.stream.copy()
        return _events_to_notes(_ngram_continue(ng, p.hist, st, p.seconds, temperature, rng), st, p.t0 + p.seconds)

    return gen


def _window(notes: NoteArrays, t0: float, seconds: float) -> tuple[NoteArrays, Notes]:
    on, off, p, v = notes
    sel = (on >= t0) & (on < t0 + seconds)
    arrays = (on[sel] - t0, np.minimum(off[sel], t0 + seconds) - t0, p[sel], v[sel])
    return arrays, Notes(arrays[0], arrays[2], seconds, arrays[3], keys_down_at_onsets(arrays[0], arrays[1]))


def _perf(a: NoteArrays) -> Performance:
    n = len(a[0])
    return Performance(
        np.asarray(a[0], np.float64),
        np.maximum(np.asarray(a[1], np.float64), a[0]),
        np.asarray(a[2], np.int16),
        np.clip(np.asarray(a[3]), 1, 127).astype(np.int16),
        np.zeros(n, np.int8),
    )


def study(
    gens: list[Named],
    pieces: Callable[[int], Performance],
    n_pieces: int,
    *,
    prompts: int,
    seconds: float,
    seed: int,
    progress: bool = True,
) -> StudyResult:
    """Overlap with the real next ``seconds`` and relatedness to the prompt, per generator. The
    prompts depend only on ``seed``; each generator samples with a seed of its own per prompt."""
    from tqdm import tqdm

    from cadenza.models.phrase.evaluate import STATS, overlap, segment_stats

    rng = np.random.default_rng(seed)
    names = [g.name for g in gens]
    ov = {k: {s: [] for s in STATS} for k in [*names, "previous_real"]}
    rel = {k: {s: [] for s in RELATEDNESS} for k in names}
    res = StudyResult(answers={k: [] for k in names})
    done = 0
    bar = tqdm(total=prompts, desc="generating", unit="prompt", disable=not progress, leave=False)
    for _ in range(prompts * 20):
        if done == prompts:
            break
        real = pieces(int(rng.integers(n_pieces)))
        ok = np.flatnonzero((real.onset > seconds + 2) & (real.onset < real.onset.max(initial=0) - seconds - 1))
        if not len(ok):
            continue
        t0 = float(real.onset[ok[int(rng.integers(len(ok)))]])
        p = make_prompt(real, t0, seconds)
        ref = segment_stats(real.onset, real.offset, real.pitch, real.velocity, t0, seconds)
        prev_arrays = (real.onset, real.offset, real.pitch.astype(np.float64), real.velocity.astype(np.float64))
        _, call = _window(prev_arrays, t0 - seconds, seconds)
        for g in gens:  # each its own seed: adding a generator changes neither the prompts nor the others' answers
            notes = g.generate(p, np.random.default_rng([seed, done, zlib.crc32(g.name.encode())]))
            s = segment_stats(*notes, t0, seconds)
            for name in STATS:
                ov[g.name][name].append(overlap(s[name], ref[name]))
            arrays, ans = _window(notes, t0, seconds)
            for k, v in relatedness(call, ans).items():
                if v is not None:
                    rel[g.name][k].append(v)
            res.answers[g.name].append(_perf(arrays))
        s = segment_stats(*prev_arrays, t0 - seconds, seconds)
        for name in STATS:
            ov["previous_real"][name].append(overlap(s[name], ref[name]))
        done += 1
        bar.update()
    bar.close()
    for k, d in ov.items():
        res.overlap[k] = {s: float(np.mean(v)) if v else None for s, v in d.items()}
        res.overlap[k]["mean"] = float(np.mean([res.overlap[k][s] for s in STATS])) if done else None
    res.relatedness = {k: {s: float(np.mean(v)) if v else None for s, v in d.items()} for k, d in rel.items()}
    res.overlap |= {"prompts": done, "seconds": seconds}
    return res


def format_relatedness(rel: dict) -> str:
    lines = [
        "call-relatedness (answer vs its prompt's last seconds; pc_corr: higher = closer; register in semitones, "
        "density/ioi in octaves of ratio: lower = closer):",
        f"{'':16}" + "".join(f"{s:>12}" for s in RELATEDNESS),
    ]
    for k, d in rel.items():
        lines.append(f"{k:16}" + "".join(f"{d[s]:>12.3f}" if d[s] is not None else f"{'-':>12}" for s in RELATEDNESS))
    return "\n".join(lines)
