"""How an answer is sampled: the rules every answering row plays by, and best-of-N.

:class:`AnswerRow` is one answer in progress: its token clock (a ``TokenStream``), the keys it
holds, whether it pressed the pedal, and the grammar rules of ``LivePhrase.respond`` as an
additive logit mask (only its own keys may be released, no key struck twice, a key held too
long is released, at most ``max_voices`` keys down, the performer's pedal is never lifted),
plus the optional key/register/pace guards as soft NOTE_ON biases. The single answer of
``respond`` and each of the N candidates of :func:`search` are AnswerRows, so both sample by
exactly the same rules.

Best-of-N (:func:`search`). The prompt's KV cache is computed once, as the performance is
played; at answer time its filled part is copied into every row of an N-row cache
(:class:`~cadenza.models.phrase.static.StaticDecoder` with ``batch=N``: a CUDA graph on CUDA),
the N candidates are sampled in one batched pass over a short horizon (``lookahead_s`` of music,
at most ``lookahead_tokens`` tokens), each is scored by
:func:`~cadenza.models.phrase.relatedness.fit_score` (the model's mean log-likelihood of its
sampled tokens plus how it fits the call), and the best one is kept: its keys and values are
copied back into the live cache and the answer goes on from its end, choosing again every
horizon.

Latency. The answer is played while it is generated, so a horizon computed before a note delays
that note. By default (``first_tokens`` = 0) the first onset is sampled alone (guards apply), so
the time to first note is what it is without best-of-N; after it, live (``LivePhrase(paced=True)``)
each horizon gets only as many tokens as can be computed in half the music that is generated
but not yet played (one onset alone while there is too little), so candidates are compared
without ever making the answer late. ``first_tokens`` > 0 compares candidates for the very
first notes too, at the price of that many batched steps before the first note
(``cadenza bench continue`` measures the time to first note either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.relatedness import FitWeights, Notes, fit_score, key_bias, register_bias

if TYPE_CHECKING:
    from cadenza.config.settings import PhraseSettings
    from cadenza.models.phrase.model import KVCache
    from cadenza.models.phrase.static import StaticDecoder

PIANO = range(21, 109)  # NOTE_ONs outside the piano are never generated
# Tokens an answer may take without its clock moving. Velocity changes, pedal and note-on/off of
# different keys need no time, so a model can cycle through them forever (the LSTM baseline did,
# and the answer never ended); a ten-finger chord with a velocity token per note is about 20.
MAX_STILL_TOKENS = 32
NEG = -float("inf")


@dataclass(frozen=True)
class AnswerOptions:
    """Best-of-N and guards (``[phrase]`` settings; see config/settings.py for each)."""

    best_of: int = 1
    lookahead_s: float = 1.0
    lookahead_tokens: int = 48
    first_tokens: int = 0
    weights: FitWeights = field(default_factory=FitWeights)
    key_guard: float = 0.0
    register_guard: float = 0.0
    register_margin: float = 5.0
    pace_guard: float = 0.0
    call_s: float = 10.0

    @property
    def guarded(self) -> bool:
        return self.key_guard > 0 or self.register_guard > 0 or self.pace_guard > 0


def options_from(ps: PhraseSettings) -> AnswerOptions:
    """AnswerOptions from a ``PhraseSettings`` section."""
    w = FitWeights(
        loglik=ps.fit_loglik,
        pc=ps.fit_pc,
        register=ps.fit_register,
        density=ps.fit_density,
        ioi=ps.fit_ioi,
        velocity=ps.fit_velocity,
        polyphony=ps.fit_polyphony,
    )
    return AnswerOptions(
        best_of=ps.best_of,
        lookahead_s=ps.lookahead_s,
        lookahead_tokens=ps.lookahead_tokens,
        first_tokens=ps.first_lookahead_tokens,
        weights=w,
        key_guard=ps.key_guard,
        register_guard=ps.register_guard,
        register_margin=ps.register_margin,
        pace_guard=ps.pace_guard,
    )


def call_notes(hist: list[int], seconds: float, quantum: float = tk.QUANTUM_S) -> Notes:
    """The notes struck in the last ``seconds`` of the context's tokens (times relative)."""
    return _notes(hist, 0, seconds, quantum, tail=True)


def _notes(toks: list[int], tick0: int, seconds: float, quantum: float, *, tail: bool, vel_bin: int = -1) -> Notes:
    """Onset, pitch, velocity and keys down at each onset of the NOTE_ONs in ``toks``; with
    ``tail`` only those in the last ``seconds``, else all, over ``seconds``."""
    tick, down, rows = tick0, set(), []
    for tok in toks:
        if tk.SHIFT0 <= tok < tk.VEL0:
            tick += tok - tk.SHIFT0 + 1
        elif tk.VEL0 <= tok < tk.SUSTAIN_ON:
            vel_bin = tok - tk.VEL0
        elif tk.NOTE_ON0 <= tok < tk.NOTE_OFF0:
            down.add(tok - tk.NOTE_ON0)
            rows.append((tick, tok - tk.NOTE_ON0, tk.bin_velocity(vel_bin if vel_bin >= 0 else tk.VELOCITY_BINS // 2), len(down)))
        elif tk.NOTE_OFF0 <= tok < tk.SHIFT0:
            down.discard(tok - tk.NOTE_OFF0)
    a = np.asarray(rows, np.float64).reshape(-1, 4)
    if tail:
        a = a[a[:, 0] >= tick - seconds / quantum]
        seconds = (tick - a[0, 0]) * quantum if len(a) else 0.0
    return Notes((a[:, 0] - tick0) * quantum, a[:, 1], max(seconds, quantum), a[:, 2], a[:, 3])


def note_bias(call: Notes, opts: AnswerOptions) -> torch.Tensor | None:
    """The key and register guards as one (128,) NOTE_ON bias; None when both are off (no change at all)."""
    if opts.key_guard <= 0 and opts.register_guard <= 0:
        return None
    b = key_bias(call.pitch, opts.key_guard) + register_bias(call.pitch, opts.register_guard, opts.register_margin)
    return torch.from_numpy(b.astype(np.float32))


@dataclass(frozen=True)
class Pace:
    """The pace guard: the call's onsets per tick and the guard's strength (``pace_guard``).

    An answer that strikes faster than the call gets a bias of ``-strength * log(ratio)`` on striking
    (NOTE_ON and VELOCITY tokens; one as much above zero when it is slower), ratio = (onsets struck + k) / (onsets the call
    would have struck in the same time + k), with k the call's onsets in one second, so a chord at
    the start counts for little and a second-long run for a lot; the log is clipped to +-2."""

    per_tick: float
    strength: float
    prior: float  # k

    @classmethod
    def of(cls, call: Notes, strength: float, quantum: float) -> Pace | None:
        if strength <= 0 or len(call) < 2:
            return None
        per_s = len(call) / call.seconds
        return cls(per_s * quantum, strength, max(2.0, per_s))

    def bias(self, struck: int, ticks: int) -> float:
        ratio = (struck + self.prior) / (self.per_tick * ticks + self.prior)
        return -self.strength * float(np.clip(np.log(ratio), -2.0, 2.0))


class AnswerRow:
    """One answer being sampled (see the module doc)."""

    def __init__(
        self,
        st: tk.TokenStream,
        *,
        mine: set[int],
        may_pedal: bool,
        max_hold: int,
        max_voices: int,
        bias: torch.Tensor | None = None,
        pace: Pace | None = None,
    ) -> None:
        self.st, self.mine, self.may_pedal = st, mine, may_pedal
        self.max_hold, self.max_voices = max_hold, max_voices
        self.held: dict[int, int] = {}  # key -> tick struck
        self.pedal = False  # this answer holds the pedal down
        self.still = 0  # tokens taken since the clock last moved
        self.pace, self.tick0, self.struck, self.after_velocity = pace, st.tick, 0, False  # for the pace guard
        self.base = torch.zeros(tk.VOCAB_SIZE)
        self.base[tk.BOS] = NEG
        self.on = torch.full((128,), NEG)
        self.on[PIANO.start : PIANO.stop] = 0
        if bias is not None:
            self.on = self.on + bias

    def copy(self) -> AnswerRow:
        other = object.__new__(AnswerRow)
        other.__dict__.update(self.__dict__)
        other.st, other.mine, other.held = self.st.copy(), set(self.mine), dict(self.held)
        return other

    def forced(self) -> int | None:
        """The NOTE_OFF of a key held ``max_hold`` ticks, if any (written like a generated one)."""
        for p, t0 in self.held.items():
            if self.st.tick - t0 >= self.max_hold:
                return tk.NOTE_OFF0 + p
        return None

    def mask(self) -> torch.Tensor:
        st = self.st
        m = self.base.clone()
        m[tk.NOTE_ON0 : tk.NOTE_ON0 + 128] = self.on if len(self.mine) < self.max_voices else NEG
        if self.pace is not None and not self.after_velocity:
            # A strike is decided where a NOTE_ON or the VELOCITY token before it is chosen; once a
            # velocity is written the NOTE_ON is all but certain, and a bias there would only pick the key.
            b = self.pace.bias(self.struck, st.tick - self.tick0)
            m[tk.NOTE_ON0 : tk.NOTE_ON0 + 128] += b
            m[tk.VEL0 : tk.SUSTAIN_ON] += b
        for p in st.sounding:
            m[tk.NOTE_ON0 + p] = NEG
        m[tk.NOTE_OFF0 : tk.NOTE_OFF0 + 128] = NEG
        for p in self.mine:  # an answer releases only its own notes
            m[tk.NOTE_OFF0 + p] = 0
        if st.vel_bin >= 0:
            m[tk.VEL0 + st.vel_bin] = NEG
        if not self.may_pedal or st.pedal:
            m[tk.SUSTAIN_ON] = NEG
        if not self.pedal:
            m[tk.SUSTAIN_OFF] = NEG
        if self.held:  # time may not jump past the next forced release
            room = min(self.held.values()) + self.max_hold - st.tick
            m[tk.SHIFT0 + room : tk.VEL0] = NEG
        if self.still >= MAX_STILL_TOKENS:  # the clock must move on: a time shift, or releasing its own keys
            m[: tk.NOTE_OFF0] = NEG
            m[tk.VEL0 :] = NEG
        return m

    def crosses(self, tok: int, end_tick: int) -> bool:
        """Whether ``tok`` is a TIME_SHIFT that moves the clock past ``end_tick``."""
        return tk.SHIFT0 <= tok < tk.VEL0 and self.st.tick + tok - tk.SHIFT0 + 1 > end_tick

    def take(self, tok: int) -> tk.Event | None:
        tick = self.st.tick
        ev = self.st.apply(tok)
        self.still = 0 if self.st.tick != tick else self.still + 1
        self.after_velocity = tk.VEL0 <= tok < tk.SUSTAIN_ON
        if ev is not None:
            if ev.kind == tk.ON:
                self.mine.add(ev.pitch)
                self.held[ev.pitch] = ev.tick
                self.struck += 1
            elif ev.kind == tk.OFF:
                self.mine.discard(ev.pitch)
                self.held.pop(ev.pitch, None)
            else:
                self.pedal = ev.value > 0
        return ev

    def adopt(self, other: AnswerRow) -> None:
        """Go on from where ``other`` (a copy of this row, sampled further) ended."""
        self.st.__dict__.update(other.st.__dict__)
        self.held, self.pedal, self.still = other.held, other.pedal, other.still
        self.struck, self.after_velocity = other.struck, other.after_velocity
        self.mine.clear()
        self.mine.update(other.mine)


@dataclass
class Choice:
    """One best-of-N decision: every candidate's score and tokens, and which was kept."""

    scores: list[float]
    tokens: list[list[int]]
    chosen: int


@dataclass
class Found:
    row: AnswerRow
    tokens: list[int]
    events: list[tk.Event]
    logits: torch.Tensor  # next-token logits after the kept candidate (V,)
    choice: Choice


KEYS = slice(tk.NOTE_ON0, tk.NOTE_OFF0)  # the NOTE_ON tokens: which key is struck


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(k, V) probabilities to sample the next token from, one row per (k, V) logits row.

    Temperature, top-k and the nucleus (top-p) shape only *which key* a NOTE_ON strikes; the
    model's odds of striking a key at all, of releasing one, of how far time moves, of a velocity
    or the pedal are sampled as the model gives them. Shaping the whole vocabulary instead skews
    the rhythm: the mass of a time shift is spread over a hundred tokens and that of releasing a
    key sits on one, so a temperature or nucleus below 1 cuts the long shifts first and the answer
    comes out dense and staccato (notes a third as long as the pianist's on MAESTRO validation,
    docs/evaluation.md). With temperature 1, top_k 0 and top_p 1 this is plain sampling."""
    probs = torch.softmax(logits, dim=-1)
    if temperature == 1.0 and not top_k and top_p >= 1.0:
        return probs
    keys = logits[:, KEYS] / temperature
    if top_k and top_k < keys.shape[-1]:
        kth = torch.topk(keys, top_k, dim=-1).values[:, -1:]
        keys = keys.masked_fill(keys < kth, NEG)
    q = torch.softmax(keys, dim=-1).nan_to_num(0.0)  # a row with every key masked: no mass to share
    if top_p < 1.0:
        sq, si = torch.sort(q, dim=-1, descending=True)
        drop = torch.cumsum(sq, dim=-1) - sq > top_p  # keep the smallest set whose mass reaches top_p
        q = q.scatter(1, si, sq.masked_fill(drop, 0.0))
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
    out = probs.clone()
    out[:, KEYS] = q * probs[:, KEYS].sum(-1, keepdim=True)
    return out


def sample_rows(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> list[int]:
    """One token per row of (k, V) logits (:func:`sampling_probs`), in one call per step
    (per-row Python calls are what a small model's candidate step costs on a CPU)."""
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()


@torch.inference_mode()
def search(
    bank: StaticDecoder,
    cache: KVCache,
    logits: torch.Tensor,
    row: AnswerRow,
    *,
    horizon_tick: int,
    cap: int,
    call: Notes,
    opts: AnswerOptions,
    sampling: tuple[float, int, float],
    generator: torch.Generator,
) -> Found:
    """Sample ``bank.batch`` candidates from the live cache's state for up to ``horizon_tick`` /
    ``cap`` tokens, score them, keep the best; ``bank`` is an N-row StaticDecoder whose cache is
    overwritten; ``sampling`` = (temperature, top_k, top_p). The caller commits the result."""
    n, p0 = bank.batch, cache.pos
    temperature, top_k, top_p = sampling
    bank.cache.k[:, :, :, :p0] = cache.k[:, :1, :, :p0].to(bank.cache.k.device)  # the prompt, broadcast to N rows
    bank.cache.v[:, :, :, :p0] = cache.v[:, :1, :, :p0].to(bank.cache.v.device)
    bank.cache.pos = p0
    rows = [row.copy() for _ in range(n)]
    toks: list[list[int]] = [[] for _ in range(n)]
    events: list[list[tk.Event]] = [[] for _ in range(n)]
    ll, counted = np.zeros(n), np.zeros(n)
    saved: list[torch.Tensor | None] = [None] * n  # a finished row's next-token logits
    cur = logits.reshape(1, -1).expand(n, -1)
    start_tick = row.st.tick
    for _ in range(max(0, min(cap, cache.max_len - p0))):
        step = [tk.BOS] * n  # finished rows write a filler token into a slot nobody reads

        def take(r: int, tok: int, step: list[int] = step) -> None:
            ev = rows[r].take(tok)
            if ev is not None:
                events[r].append(ev)
            toks[r].append(tok)
            step[r] = tok

        want = []
        for r, rw in enumerate(rows):
            if saved[r] is not None:
                continue
            tok = rw.forced()
            if tok is not None:
                take(r, tok)
            elif rw.st.tick >= horizon_tick:
                saved[r] = cur[r].clone()
            else:
                want.append(r)
        if want:
            masks = torch.stack([rows[r].mask() for r in want])
            drawn = sample_rows(cur[want] + masks, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            lsm = torch.log_softmax(cur[want], dim=-1)  # the model's own, untempered distribution
            for j, r in enumerate(want):
                if rows[r].crosses(drawn[j], horizon_tick):
                    saved[r] = cur[r].clone()
                    continue
                ll[r] += float(lsm[j, drawn[j]])
                counted[r] += 1
                take(r, drawn[j])
        if all(x is not None for x in saved):
            break
        cur = bank.step(step).float().cpu().clone()
    saved = [cur[r].clone() if x is None else x for r, x in enumerate(saved)]
    scores = []
    for r in range(n):
        span = max(rows[r].st.tick - start_tick, 10) * row.st.quantum
        ans = _notes(toks[r], start_tick, span, row.st.quantum, tail=False, vel_bin=row.st.vel_bin)
        scores.append(fit_score(call, ans, ll[r] / counted[r] if counted[r] else 0.0, opts.weights))
    best = int(np.argmax(scores))
    return Found(rows[best], toks[best], events[best], saved[best], Choice(scores, toks, best))


def commit(bank: StaticDecoder, cache: KVCache, found: Found, row_index: int | None = None) -> None:
    """Copy the kept candidate's keys and values into row 0 of the live cache after its prompt."""
    r = found.choice.chosen if row_index is None else row_index
    p0, n = cache.pos, len(found.tokens)
    if n:
        cache.k[:, 0, :, p0 : p0 + n] = bank.cache.k[:, r, :, p0 : p0 + n].to(cache.k.device)
        cache.v[:, 0, :, p0 : p0 + n] = bank.cache.v[:, r, :, p0 : p0 + n].to(cache.v.device)
    cache.pos = p0 + n
