"""Statistics of a set of performances, and how close two sets are.

Every feature is a histogram over fixed bins (so folders, the shipped reference and runs months
apart are comparable bin for bin), accumulated over all notes of all files of a set:

=============  =================================================================================
pitch          MIDI pitch, one bin per piano key
pitch_class    pitch mod 12
interval       pitch difference between successive notes (onset order), -24..24, clipped
step           time between successive onsets (0 inside a chord), geometric bins, seconds
duration       key-down time, geometric bins, seconds
velocity       note-on velocity, bins of 8
polyphony      keys down, sampled every 50 ms while the piece plays
density        note onsets per 1-second window
=============  =================================================================================

Closeness per feature: the overlap area of the two normalized histograms (sum of the bin-wise
minimum: 1 = identical, 0 = disjoint; what ``eval phrase`` has always reported) and
KL(reference || set) in nats with a small floor on empty bins (the cost of describing the
reference with the set's distribution; unbounded where the set never goes where the reference
does, hence the floor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cadenza.midifile import Performance

FRAME_S = 0.05
KL_FLOOR = 1e-4  # probability given to empty bins before KL, so one missing bin is not infinite

BINS: dict[str, np.ndarray] = {
    "pitch": np.arange(21, 110) - 0.5,
    "pitch_class": np.arange(13) - 0.5,
    "interval": np.arange(-24, 26) - 0.5,
    "step": np.concatenate([[0.0, 0.005], np.geomspace(0.01, 4.0, 25)]),
    "duration": np.geomspace(0.01, 8.0, 31),
    "velocity": np.arange(0, 129, 8, dtype=np.float64),
    "polyphony": np.arange(0, 18) - 0.5,
    "density": np.arange(0, 42, 2) - 0.5,
}
FEATURES = tuple(BINS)


def _hist(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Counts per bin; values outside are clipped into the end bins (so they still count)."""
    if len(values) == 0:
        return np.zeros(len(bins) - 1)
    v = np.clip(np.asarray(values, np.float64), bins[0], bins[-1] - 1e-9)
    return np.histogram(v, bins)[0].astype(np.float64)


def note_features(perf: Performance) -> dict[str, np.ndarray]:
    """The raw values of every feature for one performance (before binning)."""
    order = np.lexsort((perf.pitch, perf.onset))
    on, off = perf.onset[order], perf.offset[order]
    pitch = perf.pitch[order].astype(np.int64)
    if len(on):
        frames = np.arange(on[0], max(off.max(), on[0] + FRAME_S), FRAME_S)
        # keys down at each frame = onsets so far - releases so far (sorted searches, no N x F matrix)
        poly = np.searchsorted(on, frames, side="right") - np.searchsorted(np.sort(off), frames, side="right")
        windows = np.arange(on[0], on[-1] + 1.0, 1.0)
        density = np.histogram(on, windows)[0] if len(windows) > 1 else np.asarray([len(on)])
    else:
        poly = density = np.zeros(0)
    return {
        "pitch": pitch,
        "pitch_class": pitch % 12,
        "interval": np.diff(pitch),
        "step": np.diff(on),
        "duration": np.maximum(off - on, 0.0),
        "velocity": perf.velocity[order].astype(np.float64),
        "polyphony": poly,
        "density": density,
    }


@dataclass
class SetStats:
    """Histograms and summary figures of a set of performances (a folder, a model's answers)."""

    name: str
    files: int = 0
    notes: int = 0
    seconds: float = 0.0
    hist: dict[str, np.ndarray] = field(default_factory=lambda: {k: np.zeros(len(b) - 1) for k, b in BINS.items()})
    sums: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0, 0.0] for k in BINS})  # n, sum, sum of squares

    def add(self, perf: Performance) -> None:
        self.files += 1
        self.notes += len(perf)
        if len(perf):
            self.seconds += float(perf.offset.max() - perf.onset.min())
        for k, v in note_features(perf).items():
            self.hist[k] += _hist(v, BINS[k])
            s = self.sums[k]
            s[0] += len(v)
            s[1] += float(np.sum(v))
            s[2] += float(np.sum(np.square(v, dtype=np.float64)))

    def mean(self, k: str) -> float | None:
        n, s, _ = self.sums[k]
        return s / n if n else None

    def sd(self, k: str) -> float | None:
        n, s, q = self.sums[k]
        return float(np.sqrt(max(q / n - (s / n) ** 2, 0.0))) if n else None

    def summary(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {
            "files": self.files,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
            "notes_per_second": self.notes / self.seconds if self.seconds else None,
        }
        for k in FEATURES:
            out[f"{k}_mean"] = self.mean(k)
            out[f"{k}_sd"] = self.sd(k)
        return out

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "files": self.files,
            "notes": self.notes,
            "seconds": self.seconds,
            "hist": {k: v.tolist() for k, v in self.hist.items()},
            "sums": self.sums,
            "bins": {k: b.tolist() for k, b in BINS.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> SetStats:
        """Stats written by :meth:`to_json`; ValueError when their bins are not today's."""
        for k, b in BINS.items():
            got = d.get("bins", {}).get(k)
            if k not in d["hist"] or got is None or len(got) != len(b) or not np.allclose(got, b):
                raise ValueError(f"feature {k!r}: bins differ from this version's")
        return cls(
            d["name"],
            int(d["files"]),
            int(d["notes"]),
            float(d["seconds"]),
            {k: np.asarray(d["hist"][k], np.float64) for k in BINS},
            {k: list(d["sums"][k]) for k in BINS},
        )


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap area of two histograms after normalizing each (1 = same shape)."""
    if a.sum() == 0 or b.sum() == 0:
        return float(a.sum() == b.sum())
    return float(np.minimum(a / a.sum(), b / b.sum()).sum())


def kl(ref: np.ndarray, other: np.ndarray) -> float | None:
    """KL(ref || other) in nats, empty bins floored at KL_FLOOR; None when either is empty."""
    if ref.sum() == 0 or other.sum() == 0:
        return None
    p = np.maximum(ref / ref.sum(), KL_FLOOR)
    q = np.maximum(other / other.sum(), KL_FLOOR)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def compare(ref: SetStats, other: SetStats) -> dict[str, dict[str, float | None]]:
    """Per feature: overlap and KL against the reference; plus their means over features."""
    out: dict[str, dict[str, float | None]] = {
        k: {"overlap": overlap(ref.hist[k], other.hist[k]), "kl": kl(ref.hist[k], other.hist[k])} for k in FEATURES
    }
    ovs = [v["overlap"] for v in out.values() if v["overlap"] is not None]
    kls = [v["kl"] for v in out.values() if v["kl"] is not None]
    out["mean"] = {"overlap": float(np.mean(ovs)) if ovs else None, "kl": float(np.mean(kls)) if kls else None}
    return out
