"""Live call and response with the phrase model: feed what is played, answer when asked.

:class:`LivePhrase` keeps the performance as tokens in the model's KV cache as it arrives, so at
the end of a phrase the next-token distribution is already there and the first answering note
needs only a handful of one-token forward steps (the silence's TIME_SHIFT, maybe a VELOCITY, the
NOTE_ON). It is driven by ONE worker thread and is not thread-safe.

Consistency after a response. Generation runs ahead of playback, so the context may hold
generated tokens that were never heard (the performer barged in, or the consumer closed the
generator). The next ``feed`` (or ``respond``) at time t therefore cuts the response at t: tokens
past t are forgotten, response notes still sounding at t get NOTE_OFF tokens at t (the engine's
note ledger has released them for real), and only then is the new event appended. A response
that was fully played leaves nothing to cut.

Hanging notes. ``respond`` ends with note-offs (and a pedal release if it pressed the pedal) for
everything it started, at ``start_t + seconds``. When the consumer closes the generator early,
those final note-offs are not yielded: the caller releases the notes it already sent (the
engine's ledger does that on barge-in) and, if it passed a pedal press on, sends CC64 = 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from cadenza.messages import control, note_off, note_on
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.answer import (  # noqa: F401  (PIANO re-exported)
    PIANO,
    AnswerOptions,
    AnswerRow,
    Choice,
    Found,
    Pace,
    call_notes,
    commit,
    note_bias,
    sample_rows,
    search,
)
from cadenza.models.phrase.lstm import PhraseLSTM
from cadenza.models.phrase.model import PhraseModel, load_phrase  # noqa: F401  (load_phrase re-exported for the engine)
from cadenza.models.phrase.relatedness import Notes

MAX_GAP_S = 3.0  # longer silences are tokenized as this long: the model never saw longer ones
MAX_HOLD_S = 2.0  # a response key held this long is released (see respond)
MAX_VOICES = 10  # at most this many response keys down at once
PACE_SHARE = 0.5  # paced best-of-N: a horizon's compute may take this share of the music ahead of playback
MIN_HORIZON_TOKENS = 4  # below this many tokens a horizon compares nothing worth comparing


class LivePhrase:
    """Appendable context + streaming response for one performer (one worker thread)."""

    def __init__(
        self,
        model: PhraseModel | PhraseLSTM,
        *,
        max_context: int | None = None,
        keep: int | None = None,
        style: str = "classical",
        static: bool | None = None,
        answer: AnswerOptions | None = None,
        paced: bool = False,
    ):
        """``max_context``: tokens held in the cache (≤ the model's block size); when it is full
        the most recent ``keep`` tokens (default 3/4 of it) are re-prefilled and work goes on.
        ``style``: one of :data:`~cadenza.models.phrase.model.STYLES` the weights were trained with.
        ``static``: one-token steps through :class:`~cadenza.models.phrase.static.StaticDecoder`
        (a CUDA graph on CUDA); default: when the model is on a CUDA device. ``model`` may also be
        the LSTM baseline (:class:`~cadenza.models.phrase.lstm.PhraseLSTM`), always eager. ``answer``: best-of-N
        and the key/register guards (:mod:`~cadenza.models.phrase.answer`); default: neither.
        ``paced``: the answer is played as it is yielded (live): best-of-N horizons are sized so
        that generation stays ahead of playback (see ``_horizon_tokens``)."""
        from cadenza.models.phrase.model import style_index

        self.model = model
        self.style = style
        self._style = style_index(model, style)
        self.max_context = min(max_context or model.config.block_size, model.config.block_size)
        self.keep = max(1, min(keep or self.max_context * 3 // 4, self.max_context - 1))
        self.reserve = min(64, (self.max_context - self.keep) // 2)  # slots kept free for a response's start
        self.device = model.wte.weight.device
        self.decoder = None
        if (static if static is not None else self.device.type == "cuda") and isinstance(model, PhraseModel):  # (not the LSTM)
            from cadenza.models.phrase.static import StaticDecoder

            self.decoder = StaticDecoder(model, max_len=self.max_context, style=self._style)
        self.cache = self.decoder.cache if self.decoder else model.new_cache(max_len=self.max_context)
        self.answer = answer or AnswerOptions()
        self._bank = _Bank()  # the N-row decoder of best-of-N, made at the first answer that needs it
        self.paced = paced
        self._step_s = 0.005  # time per batched best-of-N step, measured as it runs (warm_up starts it)
        self.choices: list[Choice] = []  # the last answer's best-of-N decisions, in order
        self._gen = 0
        self.reset()

    def new_context(self) -> LivePhrase:
        """An empty context over the same weights and options, for another performer driven by
        the same thread: its own KV cache, the best-of-N decoder shared (its rows are scratch,
        filled from a context's cache at each horizon and copied back before the next)."""
        other = LivePhrase(
            self.model,
            max_context=self.max_context,
            keep=self.keep,
            style=self.style,
            static=self.decoder is not None,
            answer=self.answer,
            paced=self.paced,
        )
        other._bank = self._bank
        other._step_s = self._step_s
        return other

    # ---- context ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: a new performance starts with BOS."""
        self._gen += 1  # a response generator still open stops at its next step
        self.stream = tk.TokenStream()
        self.hist: list[int] = []  # every token in the context, in order (the cache holds the tail)
        self.cache.reset()
        self._resp: dict | None = None  # the last response: where it starts, the state before it
        self._logits = None
        self._push([tk.BOS])

    def warm_up(self) -> int:
        """Play a short scratch phrase in and answer it, then forget both, so the first real
        answer does not pay for first-call allocations (cache views, sampling buffers, kernel
        selection). Returns the number of answer events it produced."""
        for i, p in enumerate((60, 64, 67, 72, 67, 64)):
            self.feed(0.2 * i, note_on(0, p, 80))
            self.feed(0.2 * i + 0.15, note_off(0, p))
        paced, self.paced = self.paced, False  # so that best-of-N runs too: its decoder is made, its step timed
        try:
            n = sum(1 for _ in self.respond(start_t=1.6, seconds=1.0, seed=0))
        finally:
            self.paced = paced
        self.reset()
        return n

    @property
    def context_tokens(self) -> int:
        return self.cache.pos

    def feed(self, t: float, msg: bytes) -> None:
        """Append one played MIDI message (note on/off, CC64; others ignored) at time t (s)."""
        toks = self._tokens_for(t, msg)
        if toks:
            self._push(toks)

    def feed_many(self, events) -> None:
        """Append many (t, msg) at once (a file's worth): one prefill of the recent part."""
        toks: list[int] = []
        for t, msg in events:
            toks += self._tokens_for(t, msg)
        if toks:
            self._push(toks)

    def _tokens_for(self, t: float, msg: bytes) -> list[int]:
        ev = tk.message_event(msg)
        if ev is None:
            return []
        self._gen += 1  # a response generator still open stops at its next step
        if self.stream.t0 is None:
            self.stream.t0 = float(t)
        tick = self._settle(self.stream.tick_of(t))
        toks = self.stream.advance_to(tick)
        return toks + self.stream.feed(self.stream.time_of(tick), *ev)

    def _gap_tick(self, tick: int) -> int:
        """Clamp long silences: jump the clock so at most MAX_GAP_S is tokenized."""
        gap = int(MAX_GAP_S / self.stream.quantum)
        if tick - self.stream.tick > gap:
            self.stream.tick = tick - gap
        return tick

    def _settle(self, tick: int) -> int:
        """Make the last response end at ``tick`` in the context (see module doc); return tick."""
        resp, self._resp = self._resp, None
        if resp is not None and tick < self.stream.tick:
            self._cut(resp, tick)
        tick = max(self._gap_tick(tick), self.stream.tick)
        if resp is not None:
            mine, pedal = resp["mine"], resp["pedal"]
            toks = self.stream.advance_to(tick) if (mine or pedal) else []
            for p in sorted(mine):
                toks += self.stream.feed(self.stream.time_of(tick), tk.OFF, p)
            if pedal:
                toks += self.stream.feed(self.stream.time_of(tick), tk.PEDAL, 0, 0)
            if toks:
                self._push(toks)
        return tick

    def _cut(self, resp: dict, tick: int) -> None:
        """Forget response tokens after ``tick``: replay the response from its start state."""
        st: tk.TokenStream = resp["stream"].copy()
        start = resp["start"]
        mine: set[int] = set()
        pedal = False
        keep = len(self.hist)
        for i in range(start, len(self.hist)):
            tok = self.hist[i]
            if tk.SHIFT0 <= tok < tk.VEL0 and st.tick + tok - tk.SHIFT0 + 1 > tick:
                keep = i
                break
            ev = st.apply(tok)
            if ev is not None and ev.kind == tk.ON:
                mine.add(ev.pitch)
            elif ev is not None and ev.kind == tk.OFF:
                mine.discard(ev.pitch)
            elif ev is not None:
                pedal = ev.value > 0
        self._truncate(keep)
        self.stream = st
        resp["mine"], resp["pedal"] = mine, pedal

    def _truncate(self, n: int) -> None:
        """Drop hist[n:] from the context and recompute the logits at its new end."""
        drop = len(self.hist) - n
        if drop <= 0:
            return
        del self.hist[n:]
        if self.cache.pos - drop >= 1 and self.cache.can_rewind(drop + 1):
            self.cache.rewind(drop + 1)  # re-run the last kept token to get its logits back
            self._forward(self.hist[-1:])
        else:
            self.cache.reset()
            self._forward(self.hist[-self.keep :])

    def _push(self, toks: list[int], *, played: bool = True) -> None:
        """Append tokens to the context. For played input the cache slides early, while fewer
        than ``reserve`` slots are free, so that a response never starts with a re-prefill. A
        sliding cache (rotary model, LSTM state) is never full: it is never re-prefilled."""
        self.hist.extend(toks)
        free = self.cache.free - len(toks)
        if free < 0 or (played and free < self.reserve):  # slide: re-prefill the recent past
            self.cache.reset()
            self._forward(self.hist[-max(self.keep, min(len(toks), self.max_context)) :])
        else:
            self._forward(toks)
        limit = 8 * self.max_context  # hist only needs the cache's tokens and the last response
        if len(self.hist) > limit and (self._resp is None or self._resp["start"] > limit // 2):
            cut = len(self.hist) - limit // 2
            del self.hist[:cut]
            if self._resp is not None:
                self._resp["start"] -= cut

    @torch.inference_mode()
    def _forward(self, toks: list[int]) -> None:
        if self.decoder is not None and len(toks) == 1:  # the static (graph-replayed) step
            self._logits = self.decoder.step(toks)[0].float().cpu()
            return
        idx = torch.tensor([toks], dtype=torch.long, device=self.device)
        self._logits = self.model(idx, self.cache, last_only=True, style=self._style)[0, -1].float().cpu()

    # ---- response -----------------------------------------------------------------------------
    def respond(
        self,
        *,
        start_t: float,
        seconds: float,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        channel: int = 0,
        max_hold_s: float = MAX_HOLD_S,
        max_voices: int = MAX_VOICES,
    ) -> Iterator[tuple[float, bytes]]:
        """Generate up to ``seconds`` of answer from ``start_t``: yields (time, 3-byte message).

        Lazy: each ``next`` runs the model only as far as the next message. Times are absolute
        (the clock of ``feed``), non-decreasing and ≥ start_t. Ends with note-offs for every
        note it started (see the module doc for early closing). Two guard rails the small model
        needs (it sometimes forgets to release keys): a key held ``max_hold_s`` is released, and
        no new note starts while ``max_voices`` of the response's keys are down.
        """
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0 or seconds < 0:
            raise ValueError("temperature > 0, 0 < top_p <= 1, top_k >= 0, seconds >= 0")
        self._gen += 1  # from now on, any feed/reset/respond makes this generator stop
        limits = (max(1, int(round(max_hold_s / self.stream.quantum))), max(1, int(max_voices)))
        return self._respond(
            self._gen, float(start_t), float(seconds), float(temperature), int(top_k), float(top_p), seed, int(channel) & 15, limits
        )

    def _respond(self, me, start_t, seconds, temperature, top_k, top_p, seed, channel, limits):
        if self._gen != me:
            return
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        if self.stream.t0 is None:
            self.stream.t0 = start_t
        tick = self._settle(self.stream.tick_of(start_t))
        st = self.stream  # (settling may have replaced it)
        end_tick = st.tick_of(start_t + seconds)
        # the response, for a later cut, starts before the silence leading to it
        resp = {"start": len(self.hist), "stream": st.copy(), "mine": set(), "pedal": False}
        self._resp = resp
        shift = st.advance_to(tick)
        if shift:
            self._push(shift, played=False)
        opts = self.answer
        call = call_notes(self.hist[-self.max_context :], opts.call_s, st.quantum) if (opts.best_of > 1 or opts.guarded) else None
        row = AnswerRow(
            st,
            mine=resp["mine"],
            may_pedal=not st.pedal,  # never release a pedal the performer is holding
            max_hold=limits[0],
            max_voices=limits[1],
            bias=note_bias(call, opts) if call is not None else None,
            pace=Pace.of(call, opts.pace_guard, st.quantum) if call is not None else None,
        )
        self.choices = []

        def draw(logits, g):
            return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)

        first: list[tuple[float, float]] = []  # (wall clock, music time) of the answer's first note, once yielded

        def message(ev):
            t = st.time_of(ev.tick)
            if ev.kind == tk.ON:
                if not first:
                    first.append((time.perf_counter(), t))
                return t, note_on(channel, ev.pitch, max(1, ev.value))
            if ev.kind == tk.OFF:
                return t, note_off(channel, ev.pitch)
            return t, control(channel, 64, ev.value)

        def single(handover: bool):
            """Sample one row; with ``handover``, return True at the first TIME_SHIFT after an
            onset (not taken: best-of-N goes on from there). False: the end."""
            struck = False
            while self._gen == me and st.tick < end_tick:
                tok = row.forced()
                if tok is None:
                    tok = draw(self._logits + row.mask(), gen)
                    if handover and struck and tk.SHIFT0 <= tok < tk.VEL0:
                        return True
                    if row.crosses(tok, end_tick):
                        return False  # the model's next event lies past the end: stop without it
                ev = row.take(tok)
                resp["pedal"] = row.pedal
                self._push([tok], played=False)
                if ev is not None:
                    struck = struck or ev.kind == tk.ON
                    yield message(ev)
            return False

        horizon = max(1, int(round(opts.lookahead_s / st.quantum)))
        going = opts.best_of > 1
        while going and self._gen == me and st.tick < end_tick and self.cache.free > 1:
            cap = self._horizon_tokens(first, st.time_of(st.tick))
            if cap < MIN_HORIZON_TOKENS:  # no time to compare candidates: one onset alone, then look again
                going = yield from single(True)
                continue
            found = self._best_of(
                row, horizon_tick=min(end_tick, st.tick + horizon), cap=cap, call=call, sampling=(temperature, top_k, top_p), gen=gen
            )
            if not found.tokens:
                break  # every candidate stops at once (the answer's end is next): sample the rest singly
            row.adopt(found.row)  # the kept candidate's state becomes the answer's
            resp["pedal"] = row.pedal
            for ev in found.events:
                if self._gen != me:
                    return
                yield message(ev)
        if self._gen == me and (going or opts.best_of == 1):
            yield from single(False)
        if self._gen != me:
            return  # the context moved on (feed/reset/another respond): nothing of ours to close
        # Close what is still sounding, at the end of the response, and record it in the context.
        mine = row.mine
        toks = st.advance_to(end_tick) if (mine or resp["pedal"]) else []
        t_end = st.time_of(st.tick)
        for p in sorted(mine):
            toks += st.feed(t_end, tk.OFF, p)
        if resp["pedal"]:
            toks += st.feed(t_end, tk.PEDAL, 0, 0)
        if toks:
            self._push(toks)
        for p in sorted(mine):
            yield t_end, note_off(channel, p)
        if resp["pedal"]:
            yield t_end, control(channel, 64, 0)
        mine.clear()
        resp["pedal"] = False

    def _horizon_tokens(self, first: list[tuple[float, float]], music_now: float) -> int:
        """Token cap of the next best-of-N horizon. Before the first note it is the configured
        first cap (the first note waits for it). Paced (the answer is played as it is yielded),
        a horizon may take at most PACE_SHARE of the music already generated but not yet played,
        at the measured time per batched step, so generation stays ahead of playback."""
        if not first:
            return self.answer.first_tokens
        if not self.paced:
            return self.answer.lookahead_tokens
        wall0, music0 = first[0]
        ahead = (music_now - music0) - (time.perf_counter() - wall0)
        return max(0, min(self.answer.lookahead_tokens, int(PACE_SHARE * ahead / self._step_s)))

    def _best_of(
        self, row: AnswerRow, *, horizon_tick: int, cap: int, call: Notes, sampling: tuple[float, int, float], gen: torch.Generator
    ) -> Found:
        """One best-of-N horizon from the live cache (see answer.py), committed into it."""
        bank = self._bank.decoder
        if bank is None:
            from cadenza.models.phrase.static import StaticDecoder

            bank = self._bank.decoder = StaticDecoder(self.model, batch=self.answer.best_of, max_len=self.max_context, style=self._style)
        t0 = time.perf_counter()
        found = search(
            bank,
            self.cache,
            self._logits,
            row,
            horizon_tick=horizon_tick,
            cap=min(cap, self.cache.free - 1),
            call=call,
            opts=self.answer,
            sampling=sampling,
            generator=gen,
        )
        steps = max(map(len, found.choice.tokens)) + 1
        self._step_s = 0.7 * self._step_s + 0.3 * (time.perf_counter() - t0) / steps  # for pacing the next horizons
        commit(bank, self.cache, found)
        self.hist.extend(found.tokens)
        self._logits = found.logits
        self.choices.append(found.choice)
        return found


class _Bank:
    """Holds the best-of-N decoder that the contexts made by :meth:`LivePhrase.new_context` share."""

    decoder = None


def sample(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token from (V,) logits (:func:`~cadenza.models.phrase.answer.sampling_probs`: the
    temperature, top-k and nucleus shape which key is struck, not the rhythm)."""
    return sample_rows(logits[None], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)[0]
