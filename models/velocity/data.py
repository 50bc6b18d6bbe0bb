"""MAESTRO, preprocessed once into compact arrays for the velocity models.

Parsing 1,282 MIDI files takes minutes; training reads each split many times. So each split is
parsed once into one ``.npz`` under ``.cache/velocity/`` holding every piece's notes back to back
(onset, offset, pitch, velocity, pedal-at-onset) and their causal features (float16), with the
piece boundaries. The file is small enough (a few hundred MB for train) to carry to a GPU box.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadenza.atomic import atomic_path
from cadenza.errors import CadenzaError
from cadenza.midifile import MidiFile, Performance
from cadenza.models.velocity.features import N_FEATURES, causal_features

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(__file__).resolve().parents[2] / ".cache" / "velocity"


def maestro_pieces(root: Path, split: str) -> list[Path]:
    """Files of one official split, in the csv's order."""
    csv_path = Path(root) / "maestro-v2.0.0.csv"
    if not csv_path.is_file():
        raise CadenzaError(f"MAESTRO not found: {csv_path} is missing (set data.root or CADENZA_DATA__ROOT)")
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    if not rows:
        raise CadenzaError(f"no MAESTRO pieces in split {split!r} (train, validation, test)")
    return [Path(root) / r["midi_filename"] for r in rows]


@dataclass
class SplitData:
    """All notes of a split, piece after piece; ``starts[k]:starts[k+1]`` is piece k."""

    names: list[str]
    starts: np.ndarray  # (P+1,) int64
    onset: np.ndarray  # (N,) float64
    offset: np.ndarray
    pitch: np.ndarray  # int16
    velocity: np.ndarray  # int16
    features: np.ndarray  # (N, F) float16

    @property
    def n_pieces(self) -> int:
        return len(self.names)

    def piece(self, k: int) -> slice:
        return slice(int(self.starts[k]), int(self.starts[k + 1]))

    def performance(self, k: int) -> Performance:
        """Piece k as notes (no pedal events: the pedal already lives in the features)."""
        s = self.piece(k)
        n = s.stop - s.start
        return Performance(self.onset[s], self.offset[s], self.pitch[s], self.velocity[s], np.zeros(n, np.int8))


def build_split(root: Path, split: str, out: Path, limit: int | None = None) -> None:
    from tqdm import tqdm

    paths = maestro_pieces(root, split)[:limit]
    parts: dict[str, list] = {k: [] for k in ("onset", "offset", "pitch", "velocity", "features")}
    names, starts = [], [0]
    for path in tqdm(paths, desc=f"preprocess {split}", unit="file"):
        perf = MidiFile.load(path).performance
        if len(perf) == 0:
            continue
        parts["onset"].append(perf.onset)
        parts["offset"].append(perf.offset)
        parts["pitch"].append(perf.pitch)
        parts["velocity"].append(perf.velocity)
        parts["features"].append(causal_features(perf).astype(np.float16))
        names.append(str(path.relative_to(root)))
        starts.append(starts[-1] + len(perf))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    with atomic_path(out, suffix=".npz") as tmp:
        np.savez(tmp, names=np.array(names), starts=np.array(starts, np.int64), version=CACHE_VERSION, **arrays)


def load_split(root: Path, split: str, cache_dir: Path | None = None, limit: int | None = None) -> SplitData:
    """The split's arrays, building the cache on first use."""
    cache_dir = cache_dir or default_cache_dir()
    tag = f"{split}" if limit is None else f"{split}-{limit}"
    path = cache_dir / f"maestro-{tag}.npz"
    if path.is_file():
        z = np.load(path)
        if int(z["version"]) != CACHE_VERSION or z["features"].shape[1] != N_FEATURES:
            z = None
    else:
        z = None
    if z is None:
        log.info("preprocessing MAESTRO %s into %s", split, path)
        build_split(root, split, path, limit)
        z = np.load(path)
    return SplitData(
        names=[str(n) for n in z["names"]],
        starts=z["starts"],
        onset=z["onset"],
        offset=z["offset"],
        pitch=z["pitch"],
        velocity=z["velocity"],
        features=z["features"],
    )


def segment_starts(data: SplitData, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """``n`` random segment starts of ``length`` notes, each inside one piece, notes drawn uniformly."""
    lengths = np.diff(data.starts)
    ok = np.flatnonzero(lengths >= length)
    if len(ok) == 0:
        raise CadenzaError(f"no piece has {length} notes; use a shorter --seq-len")
    w = (lengths[ok] - length + 1).astype(np.float64)
    k = rng.choice(ok, size=n, p=w / w.sum())
    return data.starts[k] + (rng.random(n) * (lengths[k] - length + 1)).astype(np.int64)
