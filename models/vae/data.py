"""Melodies as sixteenth-note event sequences: POP909 preprocessing, user-file extraction, MIDI writing.

Representation (MusicVAE melody): one event per sixteenth, ``0`` = no event (the previous note holds,
or the rest continues), ``1`` = note-off, ``2 + (pitch - LO)`` = note-on of ``pitch``, ``LO..HI`` =
MIDI 36..95 (C2..B6, 60 pitches, 62 classes). Melodies outside the range are moved by octaves
(user files) or transposed into it (POP909 windows, see ``Windows``).

POP909 (``pop909/NNN/NNN.mid``): the MELODY and BRIDGE tracks, on the sixteenth grid of the MIDI file
(``ticks_per_beat / 4`` ticks per step) whose phase and bar lines come from ``beat_midi.txt`` (first
beat, and its third column = 4/4 downbeats); songs whose downbeats are not every 4 beats are skipped.
The whole data set is cached once as ``.cache/vae/pop909_events.npz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadenza.atomic import atomic_path
from cadenza.errors import MidiFileError

LO, HI = 36, 95
NO_EVENT, NOTE_OFF = 0, 1
VOCAB = 2 + HI - LO + 1
STEPS_PER_BAR = 16
CACHE_VERSION = 1
SPLITS = {"train": (1, 809), "validation": (810, 859), "test": (860, 909)}


def fold_pitches(pitch: np.ndarray) -> np.ndarray:
    """MIDI pitches moved by whole octaves into ``LO..HI`` (those inside stay)."""
    pitch = np.asarray(pitch, np.int64)
    pitch = np.where(pitch < LO, pitch + 12 * ((LO - pitch + 11) // 12), pitch)
    return np.where(pitch > HI, pitch - 12 * ((pitch - HI + 11) // 12), pitch)


def pitch_of(ev: int) -> int:
    return LO + int(ev) - 2


# --------------------------------------------------------------------------- MIDI reading


def _read_midi(path: Path):
    import mido

    try:
        return mido.MidiFile(str(path))
    except FileNotFoundError:
        raise MidiFileError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError, KeyError, IndexError) as exc:
        raise MidiFileError(f"{path}: not a readable MIDI file ({exc.__class__.__name__})") from None


def _track_notes(track, drums_ok: bool = False) -> list[tuple[int, int, int]]:
    """(on_tick, off_tick, pitch) of one track; channel 10 (index 9) is drums and is left out."""
    notes, open_ = [], {}
    t = 0
    for msg in track:
        t += msg.time
        if msg.type == "note_on" and msg.velocity > 0:
            if msg.channel == 9 and not drums_ok:
                continue
            key = (msg.channel, msg.note)
            if key in open_:
                notes.append((open_.pop(key), t, msg.note))
            open_[key] = t
        elif msg.type == "note_off" or (msg.type == "note_on" and msg.velocity == 0):
            key = (msg.channel, msg.note)
            if key in open_:
                notes.append((open_.pop(key), t, msg.note))
    notes.extend((on, t, p) for (_, p), on in open_.items())
    return sorted(notes)


def notes_to_events(notes: list[tuple[int, int, int]], n_steps: int, raw: bool = False) -> np.ndarray:
    """Monophonic skyline of step-quantized notes (on_step, off_step, pitch) -> events.

    At each step the highest onset wins; a note ends at its own off or at the next onset. With
    ``raw`` the events are ``pitch + 2`` (any MIDI pitch), else the ``LO..HI`` encoding.
    """
    ev = np.zeros(n_steps, np.int16)
    best: dict[int, tuple[int, int]] = {}
    for on, off, p in notes:
        if 0 <= on < n_steps and (on not in best or p > best[on][0]):
            best[on] = (p, max(off, on + 1))
    onsets = sorted(best)
    for i, on in enumerate(onsets):
        p, off = best[on]
        ev[on] = p + 2 if raw else 2 + p - LO
        nxt = onsets[i + 1] if i + 1 < len(onsets) else n_steps
        if off < nxt:
            ev[off] = NOTE_OFF
    return ev


def clean_window(ev: np.ndarray) -> np.ndarray:
    """A window cut out of a longer melody: a leading note-off (of a note before the window) goes."""
    ev = ev.copy()
    nz = np.flatnonzero(ev)
    if len(nz) and ev[nz[0]] == NOTE_OFF:
        ev[nz[0]] = NO_EVENT
    return ev


def _beats(folder: Path):
    rows = np.loadtxt(folder / "beat_midi.txt", ndmin=2)
    return rows[:, 0], rows[:, 2] if rows.shape[1] > 2 else rows[:, 1]


def _tempo_map(mid) -> list[tuple[int, int]]:
    """[(tick, tempo_us)] merged over all tracks."""
    changes = []
    for tr in mid.tracks:
        t = 0
        for msg in tr:
            t += msg.time
            if msg.type == "set_tempo":
                changes.append((t, msg.tempo))
    changes.sort()
    if not changes or changes[0][0] > 0:
        changes.insert(0, (0, 500000))
    return changes


def _seconds_to_tick(sec: float, tmap, tpb: int) -> float:
    acc = 0.0
    for i, (tick, tempo) in enumerate(tmap):
        nxt = tmap[i + 1][0] if i + 1 < len(tmap) else None
        span = (nxt - tick) * tempo / 1e6 / tpb if nxt is not None else float("inf")
        if sec <= acc + span:
            return tick + (sec - acc) * 1e6 * tpb / tempo
        acc += span
    return float(tmap[-1][0])


def pop909_song(folder: Path) -> list[tuple[str, np.ndarray]]:
    """[(track_name, raw events from the first downbeat)] of one POP909 song; [] if not in 4/4."""
    mid = _read_midi(folder / f"{folder.name}.mid")
    times, downs = _beats(folder)
    d_idx = np.flatnonzero(downs > 0.5)
    if len(d_idx) < 4 or np.mean(np.diff(d_idx) == 4) < 0.9:
        return []
    tpb = mid.ticks_per_beat
    step = tpb / 4
    tmap = _tempo_map(mid)
    origin = _seconds_to_tick(times[d_idx[0]], tmap, tpb)  # first 4/4 downbeat
    out = []
    for tr in mid.tracks:
        name = (tr.name or "").strip().upper()
        if name not in ("MELODY", "BRIDGE"):
            continue
        notes = [(int(round((a - origin) / step)), int(round((b - origin) / step)), p) for a, b, p in _track_notes(tr)]
        notes = [n for n in notes if n[0] >= 0]
        if len(notes) < 8:
            continue
        n_steps = (max(n[1] for n in notes) // STEPS_PER_BAR + 1) * STEPS_PER_BAR
        out.append((name, notes_to_events(notes, n_steps, raw=True)))
    return out


def cache_path() -> Path:
    return Path(os.environ.get("CADENZA_VAE_CACHE", ".cache/vae")) / "pop909_events.npz"


def build_cache(root: Path, path: Path | None = None, progress: bool = True) -> Path:
    """Preprocess POP909 once: every MELODY/BRIDGE track's raw events, concatenated."""
    path = path or cache_path()
    if path.is_file():
        with np.load(path) as z:
            if int(z["version"]) == CACHE_VERSION:
                return path
    from tqdm import tqdm

    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise MidiFileError(f"POP909 not found at {root} (set CADENZA_DATA__ROOT)")
    events, song, track, offs = [], [], [], [0]
    for f in tqdm(folders, desc="POP909", disable=not progress):
        for name, ev in pop909_song(f):
            events.append(ev)
            song.append(int(f.name))
            track.append(0 if name == "MELODY" else 1)
            offs.append(offs[-1] + len(ev))
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(
            tmp,
            events=np.concatenate(events),
            song=np.array(song, np.int16),
            track=np.array(track, np.int8),
            offsets=np.array(offs, np.int64),
            version=np.array(CACHE_VERSION),
        )
    return path


@dataclass
class Windows:
    """Fixed-length windows (hop one bar) of one split, as raw events, with their pitch span."""

    raw: np.ndarray  # (N, T) int16, pitch + 2 encoding
    lo: np.ndarray  # (N,) lowest pitch
    hi: np.ndarray  # (N,) highest pitch
    song: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.raw)

    def encode(self, idx: np.ndarray, rng: np.random.Generator | None = None, max_shift: int = 5) -> np.ndarray:
        """Windows ``idx`` in the LO..HI encoding; with ``rng``, randomly transposed (augmentation),
        else by the smallest shift that fits the range (mostly 0)."""
        raw = self.raw[idx].astype(np.int64)
        lo_ok = LO - self.lo[idx]
        hi_ok = HI - self.hi[idx]
        if rng is not None:
            a = np.maximum(lo_ok, -max_shift)
            b = np.minimum(hi_ok, max_shift)
            shift = a + (rng.random(len(idx)) * (b - a + 1)).astype(np.int64)
            shift = np.clip(shift, lo_ok, hi_ok)
        else:
            shift = np.clip(0, lo_ok, hi_ok)
        notes = raw >= 2
        out = np.where(notes, raw - 2 - LO + 2 + shift[:, None], raw)
        return out


def load_windows(root: Path, split: str, n_bars: int, min_notes: int | None = None, dedupe: bool = True) -> Windows:
    """All ``n_bars`` windows of ``split`` (hop one bar) with at least ``min_notes`` note-ons and a
    pitch span that fits LO..HI; identical windows kept once (pop songs repeat their choruses)."""
    with np.load(build_cache(root, progress=False)) as z:
        events, song, offsets = z["events"], z["song"], z["offsets"]
    a, b = SPLITS[split]
    T = n_bars * STEPS_PER_BAR
    min_notes = min_notes if min_notes is not None else max(3, n_bars)
    wins, sids = [], []
    for i in range(len(song)):
        if not a <= song[i] <= b:
            continue
        ev = events[offsets[i] : offsets[i + 1]]
        for s in range(0, len(ev) - T + 1, STEPS_PER_BAR):
            w = ev[s : s + T]
            if np.count_nonzero(w >= 2) >= min_notes:
                wins.append(clean_window(w))
                sids.append(song[i])
    raw = np.stack(wins).astype(np.int16)
    sids = np.array(sids)
    if dedupe:
        _, keep = np.unique(raw, axis=0, return_index=True)
        keep.sort()
        raw, sids = raw[keep], sids[keep]
    p = np.where(raw >= 2, raw - 2, -1)
    hi = p.max(1)
    lo = np.where(p >= 0, p, 999).min(1)
    ok = (hi - lo) <= (HI - LO)
    return Windows(raw[ok], lo[ok], hi[ok], sids[ok])


# --------------------------------------------------------------------------- user files


@dataclass
class Extracted:
    events: np.ndarray  # (T,) LO..HI encoding
    first_bar: int  # 1-based bar number of the window in the file
    bpm: float
    octave_shift: int


def file_melody(path: Path, n_bars: int, min_notes: int = 2) -> Extracted:
    """The top voice of ``path`` on its sixteenth grid: the first ``n_bars`` window of 4/4 bars with
    at least ``min_notes`` note-ons. Raises MidiFileError with one line when there is none."""
    mid = _read_midi(path)
    tpb = mid.ticks_per_beat
    notes, drums = [], 0
    for tr in mid.tracks:
        tn = _track_notes(tr, drums_ok=True)
        ch = {m.channel for m in tr if m.type == "note_on"}
        if ch and ch <= {9}:
            drums += len(tn)
            continue
        notes += _track_notes(tr)
    if not notes:
        raise MidiFileError(f"{path}: only drums, no pitched notes" if drums else f"{path}: no notes")
    # time signatures -> bar starts (ticks) of 4/4 bars
    sigs, t = [], 0
    for tr in mid.tracks[:1] if mid.type == 1 else mid.tracks:
        t = 0
        for m in tr:
            t += m.time
            if m.type == "time_signature":
                sigs.append((t, m.numerator, m.denominator))
    sigs = sorted(sigs) or [(0, 4, 4)]
    if sigs[0][0] > 0:
        sigs.insert(0, (0, 4, 4))
    end = max(n[1] for n in notes)
    bars = []  # (start_tick, is_44)
    for i, (t0, num, den) in enumerate(sigs):
        t1 = sigs[i + 1][0] if i + 1 < len(sigs) else end + 1
        blen = tpb * 4 * num / den
        t = t0
        while t < t1:
            bars.append((t, (num, den) == (4, 4)))
            t += blen
    if not any(ok for _, ok in bars):
        raise MidiFileError(f"{path}: no bars in 4/4 (the model knows only 4/4 melodies)")
    step = tpb / 4
    T = n_bars * STEPS_PER_BAR
    for bi in range(len(bars)):
        if not all(bars[bj][1] for bj in range(bi, min(bi + n_bars, len(bars)))):
            continue
        t0 = bars[bi][0]
        q = [(int(round((a - t0) / step)), int(round((b - t0) / step)), p) for a, b, p in notes]
        q = [n for n in q if 0 <= n[0] < T]
        if sum(1 for _ in q) < min_notes:
            continue
        if bi + n_bars > len(bars) and not all(ok for _, ok in bars[bi:]):
            continue
        ev = clean_window(notes_to_events(q, T, raw=True))
        ev, shift = _fold(ev)
        return Extracted(ev, bi + 1, _bpm_at(mid, t0), shift)
    raise MidiFileError(f"{path}: no {n_bars}-bar stretch of 4/4 with at least {min_notes} notes")


def _fold(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Raw events -> LO..HI encoding, moving the melody by whole octaves into the range."""
    p = raw[raw >= 2].astype(int) - 2
    shift = 0
    while p.min() + shift < LO:
        shift += 12
    while p.max() + shift > HI and p.min() + shift - 12 >= LO:
        shift -= 12
    out = np.where(raw >= 2, np.clip(raw.astype(int) - 2 + shift, LO, HI) - LO + 2, raw).astype(np.int64)
    return out, shift


def _bpm_at(mid, tick: float) -> float:
    tempo = 500000
    for t, tp in _tempo_map(mid):
        if t <= tick:
            tempo = tp
    return round(60e6 / tempo, 3)


# --------------------------------------------------------------------------- writing


def events_to_notes(events, step_s: float = 1.0) -> list[tuple[float, float, int]]:
    """Events -> [(t_on, t_off, pitch)] with times in ``step_s`` units (1.0 = steps)."""
    out, cur = [], None
    for i, e in enumerate(list(events) + [NOTE_OFF]):
        e = int(e)
        if e >= 1 and cur is not None:
            out.append((cur[0] * step_s, i * step_s, cur[1]))
            cur = None
        if e >= 2:
            cur = (i, pitch_of(e))
    return out


def write_midi(path: Path, events, bpm: float = 120.0, velocity: int = 90, program: int = 0, transpose: int = 0) -> None:
    """One-track MIDI of the melody at ``bpm`` (pitches moved by ``transpose`` when all stay in 0..127),
    never half-written (:func:`cadenza.atomic.atomic_path`)."""
    import mido

    tpb = 480
    step = tpb // 4
    mid = mido.MidiFile(type=0, ticks_per_beat=tpb)
    tr = mido.MidiTrack()
    mid.tracks.append(tr)
    tr.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm), time=0))
    tr.append(mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0))
    tr.append(mido.Message("program_change", program=program, time=0))
    msgs = []
    notes = events_to_notes(events, 1.0)
    if notes and not all(0 <= p + transpose <= 127 for _, _, p in notes):
        transpose = 0
    for on, off, p in notes:
        p += transpose
        msgs.append((int(on * step), 1, p, velocity))
        msgs.append((int(off * step), 0, p, 0))
    msgs.sort()
    last = 0
    for t, _, p, v in msgs:
        tr.append(mido.Message("note_on", note=p, velocity=v, time=t - last))
        last = t
    n_steps = len(events)
    tr.append(mido.MetaMessage("end_of_track", time=max(0, n_steps * step - last)))
    with atomic_path(path) as tmp:
        mid.save(str(tmp))
