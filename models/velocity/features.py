"""Note features for the velocity models, computed from notes only (never from velocities).

At a note-on the live engine knows the earlier onsets, which of the recent keys were released,
the sustain pedal and the new note's pitch — not its duration and nothing later. The features
below use exactly that, in two forms that give the same numbers:

* :func:`causal_features` — vectorised over a whole :class:`Performance` (training, files);
* :class:`LiveVelocityFeatures` — incremental, one note-on at a time (``serve``).

Both look back over a fixed window of the last ``WINDOW`` notes (a ring buffer live), so that
"keys held", "top voice" and so on are defined identically in both forms and cost O(WINDOW).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from cadenza.midifile import Performance

WINDOW = 32  # earlier notes looked at per note-on
CHORD_S = 0.03  # onsets closer than this belong to one chord
NEVER = 5.0  # seconds used for "no such earlier note" (also the cap of every time feature)
EPS = 1e-3
_LOG_NEVER = math.log(NEVER + EPS)

FEATURE_NAMES = [
    "pitch",
    "pitch_sq",
    "log_ioi",
    "log_ioi2",
    "log_group_ioi",
    "log_tempo",
    "chord_pos",
    "n_held",
    "top",
    "bottom",
    "above_max_held",
    "below_min_held",
    "rel_mean_pitch",
    "density_1s",
    "log_same_pitch",
    "pedal",
    "first",
] + [f"pc{k}" for k in range(12)]
N_FEATURES = len(FEATURE_NAMES)


def _logt(dt):
    return np.log(np.minimum(dt, NEVER) + EPS)


def _assemble(pitch, t, w_on, w_pitch, w_held, w_valid, pedal_v, i_first):
    """Shared maths of both forms.

    ``w_*`` are (N, WINDOW) arrays of the earlier notes, most recent first; ``w_held`` is whether
    each was still held at ``t``; ``w_valid`` masks slots before the piece's start.
    """
    n = len(pitch)
    p = pitch.astype(np.float64)
    f = np.zeros((n, N_FEATURES), np.float64)
    dt = np.where(w_valid, t[:, None] - w_on, np.inf)  # (N, W) seconds back
    f[:, 0] = (p - 64.0) / 24.0
    f[:, 1] = f[:, 0] ** 2
    f[:, 2] = _logt(dt[:, 0])
    f[:, 3] = _logt(dt[:, 1])
    # IOI to the latest earlier note that is not part of this note's chord.
    outside = dt >= CHORD_S
    first_out = np.where(outside.any(1), outside.argmax(1), 0)
    f[:, 4] = np.where(outside.any(1), _logt(dt[np.arange(n), first_out]), _logt(NEVER))
    f[:, 5] = _logt(dt[:, 7] / 8.0)
    f[:, 6] = np.minimum((dt < CHORD_S).sum(1), 8) / 4.0
    held = w_held & w_valid
    nh = held.sum(1)
    f[:, 7] = np.minimum(nh, 16) / 8.0
    hp = np.where(held, w_pitch, np.nan)
    any_held = nh > 0
    with np.errstate(all="ignore"):
        mx = np.where(any_held, np.nanmax(np.where(any_held[:, None], hp, 0.0), 1), p)
        mn = np.where(any_held, np.nanmin(np.where(any_held[:, None], hp, 0.0), 1), p)
    f[:, 8] = (p > mx) | ~any_held
    f[:, 9] = (p < mn) | ~any_held
    f[:, 10] = np.clip(p - mx, -36, 36) / 12.0
    f[:, 11] = np.clip(p - mn, -36, 36) / 12.0
    nv = w_valid.sum(1)
    mean_p = np.where(nv > 0, (np.where(w_valid, w_pitch, 0.0)).sum(1) / np.maximum(nv, 1), p)
    f[:, 12] = np.clip(p - mean_p, -36, 36) / 12.0
    f[:, 13] = (dt < 1.0).sum(1) / 8.0
    same = (w_pitch == p[:, None]) & w_valid
    first_same = same.argmax(1)
    f[:, 14] = np.where(same.any(1), _logt(dt[np.arange(n), first_same]), _logt(NEVER))
    f[:, 15] = pedal_v / 127.0
    f[:, 16] = i_first
    f[np.arange(n), 17 + (pitch.astype(np.int64) % 12)] = 1.0
    return f.astype(np.float32)


def causal_features(perf: Performance) -> np.ndarray:
    """(N, N_FEATURES) float32 features of every note, each from its past only."""
    n = len(perf)
    t = perf.onset.astype(np.float64)
    idx = np.arange(n)[:, None] - 1 - np.arange(WINDOW)[None, :]  # (N, W) most recent first
    valid = idx >= 0
    j = np.maximum(idx, 0)
    w_on = t[j]
    w_pitch = perf.pitch[j].astype(np.float64)
    # Held at t_i: released strictly after this onset (a release at the same instant comes first).
    w_held = perf.offset[j] > t[:, None]
    if len(perf.pedal_t):
        k = np.searchsorted(perf.pedal_t, t, side="right") - 1
        pedal_v = np.where(k >= 0, perf.pedal_v[np.maximum(k, 0)], 0).astype(np.float64)
    else:
        pedal_v = np.zeros(n)
    first = (idx[:, 0] < 0).astype(np.float64)
    return _assemble(perf.pitch, t, w_on, w_pitch, w_held, valid, pedal_v, first)


class LiveVelocityFeatures:
    """The same features, one note-on at a time, from a ring of the last ``WINDOW`` notes.

    Call :meth:`note_off` and :meth:`pedal` as those events arrive; at equal times, deliver
    releases and pedal changes before the note-on (that is the order the file form assumes).

    This runs once per live note-on inside the latency budget, so it is plain Python over the
    32-slot ring: calling :func:`_assemble` on (1, 32) arrays would cost more, because the
    per-call overhead of its many small numpy operations dominates at that size (``cadenza bench
    velocity``, features column). A test holds it equal to :func:`causal_features`.
    """

    def __init__(self) -> None:
        # The last WINDOW notes, most recent first (insert at 0, drop the last: 32 pointers moved).
        self._on: list[float] = []
        self._pitch: list[int] = []
        self._held: list[bool] = []
        self._count = 0  # notes seen so far
        self._pedal = 0.0
        self._open: dict[int, deque] = {}  # pitch -> note numbers still held, oldest first

    def reset(self) -> None:
        self.__init__()

    def note_on(self, t: float, pitch: int) -> np.ndarray:
        t = float(t)
        pitch = int(pitch)
        p = float(pitch)
        ons, pitches, helds = self._on, self._pitch, self._held
        n = len(ons)
        f = [0.0] * N_FEATURES
        x = (p - 64.0) / 24.0
        f[0] = x
        f[1] = x * x
        log_never = _LOG_NEVER
        first_out = -1.0  # dt of the latest earlier note outside this note's chord
        same = -1.0  # dt of the latest earlier note of the same pitch
        in_chord = recent = n_held = 0
        mx = -1
        mn = 1000
        psum = 0
        for on, q, held in zip(ons, pitches, helds):
            dt = t - on
            if dt < CHORD_S:
                in_chord += 1
            elif first_out < 0.0:
                first_out = dt
            if dt < 1.0:
                recent += 1
            if q == pitch and same < 0.0:
                same = dt
            if held:
                n_held += 1
                if q > mx:
                    mx = q
                if q < mn:
                    mn = q
            psum += q
        f[2] = math.log(min(t - ons[0], NEVER) + EPS) if n > 0 else log_never
        f[3] = math.log(min(t - ons[1], NEVER) + EPS) if n > 1 else log_never
        # Slots before the piece's start count as "outside the chord" at NEVER, as in the file form.
        f[4] = math.log(min(first_out, NEVER) + EPS) if first_out >= 0.0 else log_never
        f[5] = math.log(min((t - ons[7]) / 8.0, NEVER) + EPS) if n > 7 else log_never
        f[6] = min(in_chord, 8) / 4.0
        f[7] = min(n_held, 16) / 8.0
        if n_held == 0:
            f[8] = f[9] = 1.0
        else:
            f[8] = float(p > mx)
            f[9] = float(p < mn)
            f[10] = min(max(p - mx, -36.0), 36.0) / 12.0
            f[11] = min(max(p - mn, -36.0), 36.0) / 12.0
        if n:
            f[12] = min(max(p - psum / n, -36.0), 36.0) / 12.0
        f[13] = recent / 8.0
        f[14] = math.log(min(same, NEVER) + EPS) if same >= 0.0 else log_never
        f[15] = self._pedal / 127.0
        f[16] = float(self._count == 0)
        f[17 + pitch % 12] = 1.0
        ons.insert(0, t)
        pitches.insert(0, pitch)
        helds.insert(0, True)
        if n == WINDOW:
            ons.pop()
            pitches.pop()
            helds.pop()
        self._open.setdefault(pitch, deque()).append(self._count)
        self._count += 1
        return np.array(f, np.float32)

    def note_off(self, t: float, pitch: int) -> None:
        # Release the oldest held note of this pitch (first on, first off, as the file reader
        # pairs), even when it has left the window, so a later re-strike is not released instead.
        q = self._open.get(int(pitch))
        if not q:
            return
        back = self._count - 1 - q.popleft()  # its position, most recent first
        if back < len(self._held):
            self._held[back] = False

    def pedal(self, t: float, value: int) -> None:
        self._pedal = float(value)


def replay_events(perf: Performance) -> list[tuple[float, str, int, int]]:
    """The performance as a live event stream ``(time, kind, pitch_or_cc_value, note_index)``.

    Order at equal times: releases of earlier notes, pedal, then note-ons in file order; a note
    of zero length is released right after its own note-on.
    """
    ev = []
    for i, (on, off, p) in enumerate(zip(perf.onset, perf.offset, perf.pitch)):
        ev.append((float(on), 2, i, 0, "on", int(p)))
        if off > on:
            ev.append((float(off), 0, i, 0, "off", int(p)))
        else:
            ev.append((float(on), 2, i, 1, "off", int(p)))
    for k, (t, v) in enumerate(zip(perf.pedal_t, perf.pedal_v)):
        ev.append((float(t), 1, k, 0, "pedal", int(v)))
    ev.sort(key=lambda e: e[:4])
    return [(e[0], e[4], e[5], e[2]) for e in ev]


def live_features(perf: Performance) -> np.ndarray:
    """:func:`causal_features` computed through :class:`LiveVelocityFeatures` (for tests)."""
    lf = LiveVelocityFeatures()
    out = np.zeros((len(perf), N_FEATURES), np.float32)
    for t, kind, val, i in replay_events(perf):
        if kind == "on":
            out[i] = lf.note_on(t, val)
        elif kind == "off":
            lf.note_off(t, val)
        else:
            lf.pedal(t, val)
    return out


def synthetic_performance(n: int = 400, seed: int = 0) -> Performance:
    """A random performance with the awkward cases (chords, a key struck again while held, zero-length
    notes, a pedal change on a note-on's instant) for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([0.0, 0.0, 0.01, 0.05, 0.12, 0.3, 0.8], size=n)
    onset = np.cumsum(gaps)
    pitch = rng.integers(40, 90, size=n).astype(np.int16)
    pitch[10:14] = 60  # a key struck again while still held
    dur = rng.choice([0.0, 0.05, 0.2, 0.6, 2.0], size=n)
    order = np.lexsort((pitch, onset))
    onset, pitch, dur = onset[order], pitch[order], dur[order]
    pedal_t = np.sort(np.append(rng.uniform(0, onset[-1], size=39), onset[30]))  # one on a note-on's instant
    pedal_v = rng.choice([0, 40, 64, 127], size=40).astype(np.int16)
    return Performance(onset, onset + dur, pitch, np.full(n, 64, np.int16), np.zeros(n, np.int8), pedal_t, pedal_v)
