"""`cadenza bench continue`: how fast the phrase model answers.

* ``tokens_per_s``: batch 1, KV-cached, sampling ``tokens`` tokens after a ``prompt``-token
  context (when prompt + tokens exceed the model's context, the cache slides: the most recent
  3/4 is re-prefilled, and that time is included).
* ``speedup_vs_naive``: the same weights and the same sampling, but re-running the whole (last
  block_size tokens of the) sequence at every step without a cache, as a plain GPT-2 sampling
  loop does, timed in the same run.
* ``ttfn_model_ms_p50/p99``: phrase end -> first note-on yielded by :class:`LivePhrase.respond`
  after a phrase fed event by event, over ``calls`` calls (the model's share of the latency).
* ``ttfn_ms_p50/p99``: phrase end -> first note-on handed to the port through the live engine.
  That needs the engine, so it is measured by a function passed as ``ttfn`` (see run_bench).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from cadenza.messages import note_off, note_on
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.live import LivePhrase, sample
from cadenza.models.phrase.model import load_phrase


def synthetic_prompt(n: int) -> list[int]:
    """``n`` tokens of a plain arpeggiated performance (no data needed at run time)."""
    st = tk.TokenStream()
    out = [tk.BOS]
    t, i = 0.0, 0
    while len(out) < n:
        p = 48 + (0, 4, 7, 12, 16, 19, 24, 19, 16, 12, 7, 4)[i % 12] + (i // 48) % 5
        out += st.feed(t, tk.ON, p, 60 + (i * 7) % 40)
        out += st.feed(t + 0.18, tk.OFF, p)
        t += 0.2
        i += 1
    return out[:n]


@torch.inference_mode()
def _cached(model, prompt: list[int], tokens: int, gen: torch.Generator) -> tuple[float, int, list[int]]:
    block = model.config.block_size
    keep = block * 3 // 4
    cache = model.new_cache()
    dev = model.wte.weight.device
    seq = list(prompt[-block:])
    logits = model(torch.tensor([seq], device=dev), cache, last_only=True)[0, -1]
    slides = 0
    _sync(dev)
    t = time.perf_counter()
    for _ in range(tokens):
        tok = sample(logits.float().cpu(), temperature=1.0, top_k=0, top_p=1.0, generator=gen)
        seq.append(tok)
        if cache.free == 0:
            cache.reset()
            slides += 1
            logits = model(torch.tensor([seq[-keep:]], device=dev), cache, last_only=True)[0, -1]
        else:
            logits = model(torch.tensor([[tok]], device=dev), cache, last_only=True)[0, -1]
    _sync(dev)
    return time.perf_counter() - t, slides, seq


@torch.inference_mode()
def _naive(model, prompt: list[int], tokens: int, gen: torch.Generator) -> tuple[float, list[int]]:
    block = model.config.block_size
    dev = model.wte.weight.device
    seq = list(prompt)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(tokens):
        logits = model(torch.tensor([seq[-block:]], device=dev))[0, -1]
        seq.append(sample(logits.float().cpu(), temperature=1.0, top_k=0, top_p=1.0, generator=gen))
    _sync(dev)
    return time.perf_counter() - t, seq


def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def model_ttfn(model, *, calls: int, sampling: dict, seed: int = 0, answer=None) -> np.ndarray:
    """Milliseconds from the end of a phrase to the first note-on yielded, for ``calls`` calls
    (``sampling``: temperature, top_k, top_p; ``answer``: best-of-N options; both as configured
    for the live stage)."""
    live = LivePhrase(model, answer=answer)
    rng = np.random.default_rng(seed)
    out = []
    t = 0.0
    for c in range(calls):
        for _ in range(12):  # a phrase, fed as it is played
            p = int(rng.integers(48, 84))
            live.feed(t, note_on(0, p, int(rng.integers(40, 110))))
            live.feed(t + 0.15, note_off(0, p))
            t += 0.2
        t0 = time.perf_counter()
        resp = live.respond(start_t=t + 0.6, seconds=4.0, **sampling, seed=c)
        for _, m in resp:
            if m[0] & 0xF0 == 0x90:
                break
        out.append((time.perf_counter() - t0) * 1e3)
        resp.close()  # barge-in: the next phrase starts right away
        t += 1.0
    return np.asarray(out)


def answer_lateness(model, *, answer, sampling: dict, calls: int = 10, seconds: float = 6.0) -> dict:
    """Best-of-N live (paced): how late answer events come out of ``respond`` against their place
    in the music, counted from the first note's wall time, consumed as fast as it yields (as the
    worker does); and how many best-of-N horizons an answer gets."""
    live = LivePhrase(model, answer=answer, paced=True)
    live.warm_up()
    rng = np.random.default_rng(0)
    t, late, horizons = 0.0, [], []
    for c in range(calls):
        for _ in range(16):  # a quick phrase: eighth notes at 120 bpm
            p = int(rng.integers(48, 84))
            live.feed(t, note_on(0, p, 80))
            live.feed(t + 0.1, note_off(0, p))
            t += 0.125
        first = None
        for tm, m in live.respond(start_t=t + 0.3, seconds=seconds, **sampling, seed=c):
            now = time.perf_counter()
            if first is None and m[0] & 0xF0 == 0x90:
                first = (now, tm)
            if first is not None:
                late.append(max(0.0, now - first[0] - (tm - first[1])) * 1e3)
        horizons.append(len(live.choices))
        t += seconds + 1.0
    a = np.asarray(late)
    return {
        "answer_late_ms_p99": float(np.percentile(a, 99)),
        "answer_late_ms_max": float(a.max()),
        "horizons_per_answer": float(np.mean(horizons)),
    }


def run_bench(
    *,
    weights=None,
    device: str = "auto",
    threads: int | None = None,
    prompt: int = 512,
    tokens: int = 256,
    calls: int = 50,
    settings=None,
    ttfn: Callable[..., dict] | None = None,
) -> dict:
    """The figures above as one dict. ``ttfn(model, settings, calls=...)``, when given, measures
    the engine's phrase-end -> note-on latency and returns ``{"ttfn_ms_p50": .., "ttfn_ms_p99": ..}``."""
    if threads:
        torch.set_num_threads(threads)
    model = load_phrase(weights, device)
    dev = str(model.wte.weight.device)
    p = synthetic_prompt(prompt)
    _cached(model, p, 16, torch.Generator().manual_seed(0))  # warm-up
    _naive(model, p, 4, torch.Generator().manual_seed(0))
    cached_s, slides, _ = _cached(model, p, tokens, torch.Generator().manual_seed(1))
    naive_s, _ = _naive(model, p, tokens, torch.Generator().manual_seed(1))
    from cadenza.config.settings import PhraseSettings
    from cadenza.models.phrase.answer import options_from

    answer = options_from(settings.phrase) if settings is not None else None
    ps = settings.phrase if settings is not None else PhraseSettings()  # answers sample as configured
    sampling = {"temperature": ps.temperature, "top_k": ps.top_k, "top_p": ps.top_p}
    lat = model_ttfn(model, calls=calls, sampling=sampling, answer=answer)
    result = {
        "device": dev,
        "threads": torch.get_num_threads(),
        "params": model.num_params(),
        "block_size": model.config.block_size,
        "prompt_tokens": prompt,
        "generated_tokens": tokens,
        "cache_slides": slides,
        "tokens_per_s": tokens / cached_s,
        "naive_tokens_per_s": tokens / naive_s,
        "speedup_vs_naive": naive_s / cached_s,
        "ttfn_model_ms_p50": float(np.percentile(lat, 50)),
        "ttfn_model_ms_p99": float(np.percentile(lat, 99)),
        "calls": calls,
        "ttfn_ms_p50": None,
        "ttfn_ms_p99": None,
        "best_of": answer.best_of if answer else 1,
        "first_lookahead_tokens": answer.first_tokens if answer else None,
    }
    if answer is not None and answer.best_of > 1:
        result.update(answer_lateness(model, answer=answer, sampling=sampling, calls=min(calls, 10)))
    if ttfn is not None:
        result.update(ttfn(model, settings, calls=calls))
    return result


def format_bench(r: dict) -> str:
    lines = [
        f"phrase model {r['params']:,} parameters on {r['device']} ({r['threads']} threads), context {r['block_size']} tokens",
        f"tokens_per_s      {r['tokens_per_s']:10.1f}   (batch 1, KV cache, {r['generated_tokens']} tokens after {r['prompt_tokens']}; {r['cache_slides']} cache slides)",
        f"naive tokens/s    {r['naive_tokens_per_s']:10.1f}   (re-running the sequence every step)",
        f"speedup_vs_naive  {r['speedup_vs_naive']:10.1f}x",
        f"ttfn (model)      p50 {r['ttfn_model_ms_p50']:.1f} ms   p99 {r['ttfn_model_ms_p99']:.1f} ms   ({r['calls']} calls: phrase end -> first note-on from respond; best of {r.get('best_of', 1)})",
    ]
    if r.get("horizons_per_answer") is not None:
        lines.append(
            f"best-of-{r['best_of']} live     {r['horizons_per_answer']:.1f} horizons per 6 s answer, events late against the music: "
            f"p99 {r['answer_late_ms_p99']:.1f} ms, max {r['answer_late_ms_max']:.1f} ms"
        )
    if r.get("ttfn_ms_p50") is not None:
        lines.append(
            f"ttfn (engine)     p50 {r['ttfn_ms_p50']:.1f} ms   p99 {r['ttfn_ms_p99']:.1f} ms   (phrase end -> note-on at the port)"
        )
    else:
        lines.append("ttfn (engine)     not measured by this command yet (needs the live engine)")
    return "\n".join(lines)
