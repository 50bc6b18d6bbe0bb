"""`cadenza continue` and `cadenza generate`: the phrase model on files.

``continue`` keeps every byte of the input's tracks and appends the continuation as one new
track (the header's track count goes up by one; a format-0 file becomes format 1, which is the
same music). Its times are converted to the input's own ticks through the input's tempo map, so
the new track lines up in any player or DAW. ``generate`` writes notes and pedal as a fresh
one-track file. Both write atomically: on any error no output file appears.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cadenza.errors import MidiFileError
from cadenza.models.phrase import tokens as tk
from cadenza.midifile import MidiFile, Performance, write_performance
from cadenza.atomic import atomic_path


def _live(weights, seed, style="classical"):
    import torch

    from cadenza.models.phrase.model import load_phrase
    from cadenza.models.phrase.live import LivePhrase

    if seed is not None:
        torch.manual_seed(seed)
    return LivePhrase(load_phrase(weights), style=style)


def performance_messages(perf: Performance) -> list[tuple[float, bytes]]:
    """The performance as (time, raw message) in stream order (all channels merged)."""
    out = []
    for t, _, kind, p, v in tk.performance_events(perf):
        if kind == tk.ON:
            out.append((t, bytes((0x90, p, max(1, min(127, v))))))
        elif kind == tk.OFF:
            out.append((t, bytes((0x80, p, 0))))
        else:
            out.append((t, bytes((0xB0, 64, max(0, min(127, v))))))
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
    return Performance(a[:, 0], a[:, 1], a[:, 2].astype(np.int16), a[:, 3].astype(np.int16), a[:, 4].astype(np.int8),
                       np.asarray(ped_t, np.float64), np.asarray(ped_v, np.int16))


def generate_file(out: Path, *, seconds: float, temperature: float, top_k: int, top_p: float, seed: int | None,
                  weights: Path | None = None, channel: int = 0, style: str = "classical") -> int:
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


def continue_file(inp: Path, out: Path, *, seconds: float, temperature: float, top_k: int, top_p: float, seed: int | None,
                  weights: Path | None = None, style: str = "classical") -> int:
    """Append ``seconds`` of continuation to ``inp`` as a new track in ``out``; returns notes added."""
    if seconds <= 0:
        raise MidiFileError(f"--seconds must be positive (got {seconds:g})")
    mf = MidiFile.load(inp)
    perf = mf.performance
    fmt = int.from_bytes(mf.data[8:10], "big")
    if fmt == 2:
        raise MidiFileError(f"{inp}: format 2 (independent patterns) cannot be continued")
    msgs = performance_messages(perf)
    channel = int(np.bincount(perf.channel.astype(np.int64)).argmax()) if len(perf) else 0
    live = _live(weights, seed, style)
    live.feed_many(msgs)
    start = msgs[-1][0] if msgs else 0.0
    gen = list(live.respond(start_t=start, seconds=seconds, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, channel=channel))
    to_tick = _seconds_to_ticks(mf)
    track = _track_bytes([(to_tick(t), m) for t, m in gen], name=b"cadenza continuation")
    data = bytearray(mf.data)
    ntracks = int.from_bytes(data[10:12], "big")
    if ntracks >= 0xFFFF:
        raise MidiFileError(f"{inp}: already has the maximum number of tracks")
    data[8:10] = (1).to_bytes(2, "big")
    data[10:12] = (ntracks + 1).to_bytes(2, "big")
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(data) + track)
    return sum(1 for _, m in gen if m[0] & 0xF0 == 0x90)


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def _track_bytes(events: list[tuple[int, bytes]], *, name: bytes) -> bytes:
    body = bytearray(b"\x00\xff\x03" + _vlq(len(name)) + name)
    last = 0
    for tick, msg in events:
        tick = max(tick, last)
        body += _vlq(tick - last) + msg
        last = tick
    body += b"\x00\xff\x2f\x00"
    return b"MTrk" + len(body).to_bytes(4, "big") + bytes(body)


def _seconds_to_ticks(mf: MidiFile):
    """Seconds -> ticks of this file (its tempo map; SMPTE division is linear)."""
    data = mf.data
    division = int.from_bytes(data[12:14], "big")
    if division & 0x8000:
        fps = 256 - (division >> 8)
        fps = 29.97 if fps == 29 else fps
        per_s = fps * (division & 0xFF)
        return lambda s: int(round(s * per_s))
    tempos = sorted(_tempo_events(data))
    tt = [0] + [t for t, _ in tempos if t > 0]
    tv = [next((v for t, v in tempos if t == 0), 500_000)] + [v for t, v in tempos if t > 0]
    secs = [0.0]
    for i in range(1, len(tt)):
        secs.append(secs[-1] + (tt[i] - tt[i - 1]) * tv[i - 1] / (1e6 * division))

    def convert(s: float) -> int:
        i = max(0, int(np.searchsorted(secs, s, side="right")) - 1)
        return int(round(tt[i] + (s - secs[i]) * 1e6 * division / tv[i]))

    return convert


def _tempo_events(data: bytes) -> list[tuple[int, int]]:
    """(tick, microseconds per beat) of every Set Tempo in the file (already validated by smf)."""
    from cadenza.midifile import DATA_BYTES, read_vlq

    out = []
    hlen = int.from_bytes(data[4:8], "big")
    pos = 8 + hlen
    while pos + 8 <= len(data):
        ctype, clen = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "big")
        p, end = pos + 8, min(pos + 8 + clen, len(data))
        pos = end
        if ctype != b"MTrk":
            continue
        tick, status = 0, 0
        while p < end:
            delta, p = read_vlq(data, p, end)
            tick += delta
            b = data[p]
            if b == 0xFF:
                mtype = data[p + 1]
                mlen, q = read_vlq(data, p + 2, end)
                if mtype == 0x51 and mlen == 3:
                    out.append((tick, int.from_bytes(data[q : q + 3], "big")))
                p = q + mlen
                if mtype == 0x2F:
                    break
                continue
            if b in (0xF0, 0xF7):
                slen, q = read_vlq(data, p + 1, end)
                p, status = q + slen, 0
                continue
            if b & 0x80:
                status, p = b, p + 1
            p += DATA_BYTES.get(status & 0xF0, 0)
    return out
