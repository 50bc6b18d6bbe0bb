"""`cadenza continue` and `cadenza generate`: the phrase model on files.

``continue`` keeps every byte of the input's tracks and appends the continuation as one new
track (the header's track count goes up by one; a format-0 file becomes format 1, which is the
same music; :meth:`cadenza.midifile.MidiFile.with_track`). Its times are converted to the input's
own ticks through the input's tempo map, so the new track lines up in any player or DAW. ``generate`` writes notes and pedal as a fresh
one-track file. Both write atomically: on any error no output file appears.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cadenza.atomic import write_atomic
from cadenza.errors import MidiFileError
from cadenza.messages import control, note_off, note_on
from cadenza.midifile import SUSTAIN_CC, MidiFile, Performance, write_performance
from cadenza.models.phrase import tokens as tk
from cadenza.models.phrase.answer import AnswerOptions


def _live(weights, seed, style="classical", answer=None):
    import torch

    from cadenza.models.phrase.live import LivePhrase
    from cadenza.models.phrase.model import load_phrase

    if seed is not None:
        torch.manual_seed(seed)
    return LivePhrase(load_phrase(weights), style=style, answer=answer)


def performance_messages(perf: Performance) -> list[tuple[float, bytes]]:
    """The performance as (time, raw message) in stream order (all channels merged)."""
    out = []
    for t, _, kind, p, v in tk.performance_events(perf):
        if kind == tk.ON:
            out.append((t, note_on(0, p, max(1, min(127, v)))))
        elif kind == tk.OFF:
            out.append((t, note_off(0, p)))
        else:
            out.append((t, control(0, SUSTAIN_CC, max(0, min(127, v)))))
    return out


def messages_to_performance(msgs: list[tuple[float, bytes]]) -> Performance:
    """Pair note-ons with note-offs; notes left open end at the last message."""
    end = msgs[-1][0] if msgs else 0.0
    open_on: dict[tuple[int, int], tuple[float, int]] = {}
    notes, ped_t, ped_v = [], [], []
    for t, m in msgs:
        kind, ch = m[0] & 0xF0, m[0] & 0x0F
        if kind == 0x90 and m[2] > 0:
            open_on[(ch, m[1])] = (t, m[2])
        elif kind in (0x80, 0x90) and (ch, m[1]) in open_on:
            s, v = open_on.pop((ch, m[1]))
            notes.append((s, t, m[1], v, ch))
        elif kind == 0xB0 and m[1] == 64:
            ped_t.append(t)
            ped_v.append(m[2])
    notes += [(s, end, p, v, ch) for (ch, p), (s, v) in open_on.items()]
    notes.sort()
    a = np.asarray(notes, np.float64).reshape(-1, 5)
    return Performance(
        a[:, 0],
        a[:, 1],
        a[:, 2].astype(np.int16),
        a[:, 3].astype(np.int16),
        a[:, 4].astype(np.int8),
        np.asarray(ped_t, np.float64),
        np.asarray(ped_v, np.int16),
    )


def generate_file(
    out: Path,
    *,
    seconds: float,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    weights: Path | None = None,
    channel: int = 0,
    style: str = "classical",
) -> int:
    """Unconditioned generation of ``seconds`` into ``out``; returns the number of notes."""
    if seconds <= 0:
        raise MidiFileError(f"--seconds must be positive (got {seconds:g})")
    if not 0 <= channel <= 15:
        raise MidiFileError(f"--channel must be 0-15 (got {channel})")
    live = _live(weights, seed, style)
    msgs = list(live.respond(start_t=0.0, seconds=seconds, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, channel=channel))
    perf = messages_to_performance(msgs)
    write_performance(perf, out)
    return len(perf)


def continue_file(
    inp: Path,
    out: Path,
    *,
    seconds: float,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    weights: Path | None = None,
    style: str = "classical",
    answer: AnswerOptions | None = None,
) -> int:
    """Append ``seconds`` of continuation to ``inp`` as a new track in ``out``; returns notes added.
    ``answer``: best-of-N and the guards, as live (the call is the input's last seconds)."""
    if seconds <= 0:
        raise MidiFileError(f"--seconds must be positive (got {seconds:g})")
    mf = MidiFile.load(inp)
    perf = mf.performance
    if mf.format == 2:
        raise MidiFileError(f"{inp}: format 2 (independent patterns) cannot be continued")
    msgs = performance_messages(perf)
    channel = int(np.bincount(perf.channel.astype(np.int64)).argmax()) if len(perf) else 0
    live = _live(weights, seed, style, answer)
    live.feed_many(msgs)
    start = msgs[-1][0] if msgs else 0.0
    gen = list(live.respond(start_t=start, seconds=seconds, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, channel=channel))
    write_atomic(out, mf.with_track(gen, name=b"cadenza continuation"))
    return sum(1 for _, m in gen if m[0] & 0xF0 == 0x90)
