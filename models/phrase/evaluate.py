"""`cadenza eval phrase`: likelihood and generation statistics on a MAESTRO split.

1. NLL per token (nats) and per second of music for the transformer and for an n-gram baseline
   fitted on the train split, both on exactly the same tokens. The transformer reads each piece
   in windows of its context length that overlap by ``OVERLAP`` tokens, so every scored token
   has at least that much context (except at the start of a piece, as for the n-gram).
2. For ``prompts`` prompts (a random moment in a random piece), the model and the n-gram each
   continue the preceding context for ``seconds``; the result is compared with what the pianist
   really played next, as overlap areas (sum of min of two normalized histograms; 1 = same) of
   pitch class, inter-onset interval, note density, velocity and polyphony. As a reference, the
   real *previous* ``seconds`` are compared with the real next ones the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cadenza.errors import CadenzaError
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.data import TokenSplit, load_split
from cadenza.models.phrase.model import WEIGHTS_DIR, load_phrase
from cadenza.models.phrase.ngram import NGram

if TYPE_CHECKING:
    from cadenza.models.phrase.answer import AnswerOptions
    from cadenza.models.phrase.calls import Named, StudyResult

OVERLAP = 128
LSTM_WEIGHTS = WEIGHTS_DIR / "phrase_lstm.safetensors"  # the baseline row, when trained
STATS = ("pitch_class", "ioi", "density", "velocity", "polyphony")


def _pick(ts: TokenSplit, limit: int | None) -> list[int]:
    """Evenly spaced pieces (all when limit is None/0): deterministic and spread over composers."""
    if not limit or limit >= len(ts):
        return list(range(len(ts)))
    return sorted(set(np.linspace(0, len(ts) - 1, limit).round().astype(int).tolist()))


@torch.inference_mode()
def model_log_probs(model, piece: np.ndarray, style: int = 0, window: int | None = None) -> np.ndarray:
    """ln p(token_i | previous tokens of the piece, up to the context length), i = 1..n-1.

    ``window``: tokens per forward pass (default the model's context length); consecutive windows
    share ``OVERLAP`` tokens (at most half a window, so a short one still moves on)."""
    T = window or model.config.block_size
    overlap = min(OVERLAP, T // 2)
    n = len(piece)
    out = np.empty(n - 1)
    begin, scored = 0, 1
    while True:
        end = min(begin + T, n)
        x = torch.from_numpy(piece[begin:end].astype(np.int64))[None]
        lp = torch.log_softmax(model(x, style=style)[0, :-1].float(), -1)  # predicts positions begin+1 .. end-1
        tgt = x[0, 1:]
        vals = lp.gather(1, tgt[:, None])[:, 0].numpy()
        out[scored - 1 : end - 1] = vals[scored - begin - 1 :]
        scored = end
        if end == n:
            return out
        begin = end - overlap


# ---- generation statistics --------------------------------------------------------------------


def _hist(values, bins) -> np.ndarray:
    h = np.histogram(np.clip(values, bins[0], bins[-1] - 1e-9), bins)[0].astype(np.float64) if len(values) else np.zeros(len(bins) - 1)
    return h


def segment_stats(onset, offset, pitch, velocity, t0: float, seconds: float) -> dict[str, np.ndarray]:
    """Histograms of the notes starting in [t0, t0 + seconds)."""
    sel = (onset >= t0) & (onset < t0 + seconds)
    on, off, p, v = onset[sel] - t0, np.minimum(offset[sel], t0 + seconds) - t0, pitch[sel], velocity[sel]
    uniq = np.unique(np.round(on, 2))
    frames = np.arange(0, seconds, 0.05)
    poly = ((on[None, :] <= frames[:, None]) & (off[None, :] > frames[:, None])).sum(1) if len(on) else np.zeros(len(frames))
    return {
        "pitch_class": np.bincount(p.astype(np.int64) % 12, minlength=12).astype(np.float64),
        "ioi": _hist(np.diff(uniq), np.geomspace(0.01, 4.0, 21)),
        "density": _hist(np.histogram(on, np.arange(0, seconds + 1e-9, 1.0))[0], np.arange(0, 33, 2)),
        "velocity": _hist(v, np.arange(0, 129, 8)),
        "polyphony": _hist(poly, np.arange(0, 14)),
    }


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    if a.sum() == 0 or b.sum() == 0:
        return float(a.sum() == b.sum())
    return float(np.minimum(a / a.sum(), b / b.sum()).sum())


def _ngram_continue(ng: NGram, history: list[int], stream: tk.TokenStream, seconds: float, temperature: float, rng) -> list[tk.Event]:
    """Sample the n-gram after ``history`` until ``seconds`` of music, with the same grammar rules."""
    end_tick = stream.tick + int(round(seconds / stream.quantum))
    hist = list(history[-(ng.order - 1) :]) if ng.order > 1 else []
    from cadenza.models.phrase.live import MAX_HOLD_S, MAX_VOICES

    events = []
    held: dict[int, int] = {}  # the live guard rails, so both models play by the same rules
    for _ in range(20000):
        overdue = [q for q, t in held.items() if stream.tick - t >= MAX_HOLD_S / stream.quantum]
        if overdue:
            tok = tk.NOTE_OFF0 + overdue[0]
        else:
            p = ng.next_probs(hist) ** (1.0 / temperature)
            p[tk.BOS] = 0
            p[tk.NOTE_ON0 : tk.NOTE_ON0 + 128][list(stream.sounding)] = 0
            if len(held) >= MAX_VOICES:
                p[tk.NOTE_ON0 : tk.NOTE_ON0 + 128] = 0
            off = np.zeros(128, bool)
            off[list(held)] = True
            p[tk.NOTE_OFF0 : tk.NOTE_OFF0 + 128][~off] = 0
            tok = int(rng.choice(tk.VOCAB_SIZE, p=p / p.sum()))
        if tk.SHIFT0 <= tok < tk.VEL0 and stream.tick + tok - tk.SHIFT0 + 1 > end_tick:
            break
        ev = stream.apply(tok)
        hist = (hist + [tok])[-(ng.order - 1) :] if ng.order > 1 else []
        if ev is not None:
            events.append(ev)
            if ev.kind == tk.ON:
                held[ev.pitch] = ev.tick
            elif ev.kind == tk.OFF:
                held.pop(ev.pitch, None)
    return events


def _events_to_notes(events: list[tk.Event], stream: tk.TokenStream, end: float):
    on: dict[int, tuple[float, int]] = {}
    notes = []
    for ev in events:
        t = stream.time_of(ev.tick)
        if ev.kind == tk.ON:
            on[ev.pitch] = (t, ev.value)
        elif ev.kind == tk.OFF and ev.pitch in on:
            s, v = on.pop(ev.pitch)
            notes.append((s, t, ev.pitch, v))
    notes += [(s, end, p, v) for p, (s, v) in on.items()]
    a = np.asarray(notes, np.float64).reshape(-1, 4)
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3]


def generation_stats(
    model,
    ng: NGram,
    ts: TokenSplit,
    *,
    prompts: int,
    seconds: float,
    seed: int,
    sampling,
    answer: AnswerOptions | None = None,
    extra: list[Named] | None = None,
    progress: bool = False,
) -> StudyResult:
    """Overlap with the real continuation and call-relatedness (models/phrase/calls.py) of the
    transformer (through the live API as on stage; ``answer``: best-of-N and guards), the n-gram,
    the real continuation, and any ``extra`` generators (calls.Named). Returns calls.StudyResult."""
    from cadenza.models.phrase.calls import Named, live_generator, ngram_generator, real_next, study
    from cadenza.models.phrase.live import LivePhrase

    gens = [
        Named("model", live_generator(LivePhrase(model, answer=answer), sampling)),
        Named("ngram", ngram_generator(ng, sampling.temperature)),
        *(extra or []),
        Named("real", real_next),
    ]
    res = study(gens, lambda i: tk.decode_tokens(ts.piece(i)[1:]), len(ts), prompts=prompts, seconds=seconds, seed=seed, progress=progress)
    res.overlap.pop("real", None)  # the real continuation against itself: 1 by definition
    return res


def _pair(msgs, end):
    on: dict[int, tuple[float, int]] = {}
    notes = []
    for t, m in msgs:
        if m[0] & 0xF0 == 0x90:
            on[m[1]] = (t, m[2])
        elif m[0] & 0xF0 == 0x80 and m[1] in on:
            s, v = on.pop(m[1])
            notes.append((s, t, m[1], v))
    notes += [(s, end, p, v) for p, (s, v) in on.items()]
    a = np.asarray(notes, np.float64).reshape(-1, 4)
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3]


def evaluate(
    maestro_root: Path,
    *,
    split: str,
    limit: int | None,
    prompts: int,
    seconds: float,
    ngram_order: int,
    weights: Path | None,
    seed: int,
    threads: int,
    sampling,
    pop909_root: Path | None = None,
    answer: AnswerOptions | None = None,
    report: Path | None = None,
    lstm: Path | None = LSTM_WEIGHTS,
) -> dict:
    """``lstm``: the LSTM baseline's weights, scored on the same tokens when the file exists."""
    torch.set_num_threads(threads)
    t_start = time.monotonic()
    model = load_phrase(weights)
    rnn = load_phrase(lstm) if lstm is not None and Path(lstm).is_file() else None
    r_nll = 0.0
    train = load_split(maestro_root, "train")
    ng = NGram(ngram_order, tk.VOCAB_SIZE).fit(train.tokens)
    del train
    ts = load_split(maestro_root, split)
    picked = _pick(ts, limit)
    m_nll = n_nll = 0.0
    count = 0
    secs = 0.0
    from tqdm import tqdm

    for i in tqdm(picked, desc=f"scoring {split}", unit="piece"):
        piece = ts.piece(i)
        m_nll -= model_log_probs(model, piece).sum()
        if rnn is not None:  # the same windows as the transformer's, from a zero state each
            r_nll -= model_log_probs(rnn, piece, window=model.config.block_size).sum()
        n_nll -= ng.log_probs(piece).sum()
        count += len(piece) - 1
        secs += float(ts.seconds[i])
    extra = []
    if rnn is not None:  # the baseline answers by the same rules, one candidate (best-of-N batches a transformer cache)
        from dataclasses import replace

        from cadenza.models.phrase.calls import Named, live_generator
        from cadenza.models.phrase.live import LivePhrase

        plain = replace(answer, best_of=1) if answer is not None else None
        extra.append(Named("lstm", live_generator(LivePhrase(rnn, answer=plain), sampling)))
    study = generation_stats(
        model, ng, ts, prompts=prompts, seconds=seconds, seed=seed, sampling=sampling, answer=answer, extra=extra, progress=True
    )
    gen = study.overlap
    if report is not None:
        from cadenza.models.phrase.report import phrase_report

        phrase_report(report, study, maestro_root)
    styles = pop909_by_style(model, ng, pop909_root, split, limit) if pop909_root is not None and model.config.n_styles > 1 else None
    return {
        "pop909_by_style": styles,
        "split": split,
        "pieces": len(picked),
        "tokens": count,
        "music_seconds": round(secs, 1),
        "model": {"nll_per_token": m_nll / count, "nll_per_second": m_nll / secs, "params": model.num_params()},
        f"ngram{ngram_order}": {"nll_per_token": n_nll / count, "nll_per_second": n_nll / secs},
        "lstm": {"nll_per_token": r_nll / count, "nll_per_second": r_nll / secs, "params": rnn.num_params()} if rnn is not None else None,
        "generation_overlap": gen,
        "call_relatedness": study.relatedness,
        "best_of": answer.best_of if answer is not None else 1,
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "shapes": "keys struck"},
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }


def pop909_by_style(model, ng, root: Path, split: str, limit: int | None) -> dict | None:
    """NLL per token of the POP909 split with each style vector (does the style help?), and the
    MAESTRO-trained n-gram for reference; None when POP909 is not there."""
    from cadenza.models.phrase.data import load_pop909
    from cadenza.models.phrase.model import STYLES

    try:
        ts = load_pop909(root, split, progress=False)
    except CadenzaError:
        return None
    picked = _pick(ts, limit)
    nll = {s: 0.0 for s in STYLES}
    n_nll, count = 0.0, 0
    for i in picked:
        piece = ts.piece(i)
        for k, s in enumerate(STYLES):
            nll[s] -= model_log_probs(model, piece, style=k).sum()
        n_nll -= ng.log_probs(piece).sum()
        count += len(piece) - 1
    return {
        "pieces": len(picked),
        "tokens": count,
        **{f"nll_per_token_{s}": nll[s] / count for s in STYLES},
        "ngram_nll_per_token": n_nll / count,
    }


def format_report(r: dict) -> str:
    ng = next(k for k in r if k.startswith("ngram"))
    lines = [
        f"MAESTRO {r['split']}: {r['pieces']} pieces, {r['tokens']:,} tokens, {r['music_seconds'] / 3600:.2f} h of music",
        f"{'':14}{'NLL/token (nats)':>18}{'NLL/second':>14}",
        f"{'transformer':14}{r['model']['nll_per_token']:>18.4f}{r['model']['nll_per_second']:>14.2f}",
        f"{ng + ' baseline':14}{r[ng]['nll_per_token']:>18.4f}{r[ng]['nll_per_second']:>14.2f}",
    ]
    if r.get("lstm"):
        lines.insert(3, f"{'LSTM baseline':14}{r['lstm']['nll_per_token']:>18.4f}{r['lstm']['nll_per_second']:>14.2f}")
    g = r["generation_overlap"]
    lines.append(
        f"generated {g['seconds']:g} s vs the real next {g['seconds']:g} s, {g['prompts']} prompts (histogram overlap, 1 = identical):"
    )
    lines.append(f"{'':16}" + "".join(f"{s:>12}" for s in STATS + ("mean",)))
    for k in [k for k in g if isinstance(g[k], dict)]:  # model, ngram, any extra generator, previous_real
        lines.append(f"{k:16}" + "".join(f"{g[k][s]:>12.3f}" for s in STATS + ("mean",)))
    p = r.get("pop909_by_style")
    if p:
        lines.append(
            f"POP909 {r['split']} ({p['pieces']} songs, {p['tokens']:,} tokens), NLL/token: pop style {p['nll_per_token_pop']:.4f}, "
            f"classical style {p['nll_per_token_classical']:.4f}, {ng} (MAESTRO-trained) {p['ngram_nll_per_token']:.4f}"
        )
    if r.get("call_relatedness"):
        from cadenza.models.phrase.calls import format_relatedness

        lines.append(format_relatedness(r["call_relatedness"]))
    lines.append(f"({r['elapsed_s']:.0f} s)")
    return "\n".join(lines)
