"""How an answer relates to its call: key, register, density and pace.

Used twice: live, to pick the best of N candidate answers (:func:`fit_score`, with the weights
from ``[phrase]`` settings), and in ``cadenza eval phrase``, to report how closely the model,
the baselines and the real continuation follow the prompt (:func:`relatedness`).

A call or answer is a pair of arrays (onsets in seconds, MIDI pitches) plus its length in seconds.

* ``pc_corr``: Pearson correlation of the two pitch-class profiles (duration-blind note counts;
  1 = the same key content, 0 = unrelated or undefined).
* ``register``: distance between mean pitches, in semitones.
* ``density``: |log2| of the ratio of notes per second (1 = twice or half as many).
* ``ioi``: |log2| of the ratio of median inter-onset intervals between distinct onsets (the pace).
* ``velocity``: distance between mean velocities (when both sides know them).
* ``polyphony``: |log2| of the ratio of the mean number of keys down at an onset.

A call's key is estimated from its profile with the Krumhansl-Kessler key profiles (the major
or minor key whose profile correlates best); :func:`key_bias` and :func:`register_bias` turn
the call into soft NOTE_ON logit biases for the optional guards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Krumhansl & Kessler (1982) probe-tone profiles, C major and C minor.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAJOR_SCALE = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR_SCALE = np.array([0, 2, 3, 5, 7, 8, 10, 11])  # harmonic and natural minor together
RELATEDNESS = ("pc_corr", "register", "density", "ioi", "velocity", "polyphony")


@dataclass(frozen=True)
class Notes:
    onset: np.ndarray  # (N,) seconds
    pitch: np.ndarray  # (N,) MIDI pitch
    seconds: float  # the span the notes were taken from (for the density)
    velocity: np.ndarray | None = None  # (N,) note-on velocities, when known
    poly: np.ndarray | None = None  # (N,) keys down at each onset (the note itself included), when known

    def __len__(self) -> int:
        return len(self.pitch)


def keys_down_at_onsets(onset: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """For each note, how many notes (itself included) are down at its onset."""
    on, off = np.asarray(onset, np.float64), np.sort(np.asarray(offset, np.float64))
    return (np.searchsorted(np.sort(on), on, side="right") - np.searchsorted(off, on, side="right")).astype(np.float64)


def profile(pitch: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(pitch, np.int64) % 12, minlength=12).astype(np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def _median_ioi(onset: np.ndarray) -> float | None:
    u = np.unique(np.round(np.asarray(onset, np.float64), 2))
    return float(np.median(np.diff(u))) if len(u) > 1 else None


def relatedness(call: Notes, answer: Notes) -> dict[str, float | None]:
    """The four measures above (None where one side has too few notes to say)."""
    if not len(call) or not len(answer):
        return {k: None for k in RELATEDNESS}
    dc, da = len(call) / max(call.seconds, 1e-3), len(answer) / max(answer.seconds, 1e-3)
    ic, ia = _median_ioi(call.onset), _median_ioi(answer.onset)
    both = call.velocity is not None and answer.velocity is not None
    return {
        "pc_corr": _corr(profile(call.pitch), profile(answer.pitch)),
        "register": abs(float(np.mean(call.pitch)) - float(np.mean(answer.pitch))),
        "density": abs(float(np.log2(da / dc))),
        "ioi": abs(float(np.log2(ia / ic))) if ic and ia else None,
        "velocity": abs(float(np.mean(call.velocity)) - float(np.mean(answer.velocity))) if both else None,
        "polyphony": abs(float(np.log2(np.mean(answer.poly) / np.mean(call.poly))))
        if call.poly is not None and answer.poly is not None
        else None,
    }


@dataclass(frozen=True)
class FitWeights:
    """Weights of the best-of-N score: loglik * mean log-likelihood per token + pc * pc_corr
    - register * register/12 - density * density - ioi * ioi - velocity * velocity/16
    - polyphony * polyphony (see the module doc)."""

    loglik: float = 1.0  # defaults = the [phrase] fit_* defaults, chosen on MAESTRO validation (docs/evaluation.md)
    pc: float = 2.0
    register: float = 1.0
    density: float = 2.0
    ioi: float = 1.0
    velocity: float = 0.0
    polyphony: float = 0.0


def fit_score(call: Notes, answer: Notes, mean_loglik: float, w: FitWeights) -> float:
    """One number per candidate; higher is better. A candidate with no note scores -inf unless
    the call had none either (then only the likelihood speaks)."""
    if not len(answer):
        return -float("inf") if len(call) else w.loglik * mean_loglik
    r = relatedness(call, answer)
    s = w.loglik * mean_loglik
    if r["pc_corr"] is not None:
        s += w.pc * r["pc_corr"] - w.register * r["register"] / 12.0 - w.density * r["density"]
    if r["ioi"] is not None:
        s -= w.ioi * r["ioi"]
    if r["velocity"] is not None:
        s -= w.velocity * r["velocity"] / 16.0
    if r["polyphony"] is not None:
        s -= w.polyphony * r["polyphony"]
    return float(s)


def estimate_key(pitch: np.ndarray) -> tuple[int, bool]:
    """(tonic pitch class, is_major) of the best-correlating Krumhansl-Kessler key."""
    prof = profile(pitch)
    best = max(((_corr(prof, np.roll(p, k)), k, major) for k in range(12) for p, major in ((KK_MAJOR, True), (KK_MINOR, False))))
    return best[1], best[2]


def key_bias(call_pitch: np.ndarray, strength: float) -> np.ndarray:
    """(128,) bias: 0 for pitches of the call's estimated key's scale, -strength for the others."""
    out = np.zeros(128)
    if strength <= 0 or len(call_pitch) < 3:
        return out
    tonic, major = estimate_key(call_pitch)
    scale = (tonic + (MAJOR_SCALE if major else MINOR_SCALE)) % 12
    out[~np.isin(np.arange(128) % 12, scale)] = -strength
    return out


def register_bias(call_pitch: np.ndarray, strength: float, margin: float) -> np.ndarray:
    """(128,) bias: 0 within ``margin`` semitones of the call's range, then -strength per octave beyond."""
    out = np.zeros(128)
    if strength <= 0 or not len(call_pitch):
        return out
    lo, hi = float(np.min(call_pitch)) - margin, float(np.max(call_pitch)) + margin
    p = np.arange(128, dtype=np.float64)
    beyond = np.maximum(lo - p, 0) + np.maximum(p - hi, 0)
    return -strength * beyond / 12.0
