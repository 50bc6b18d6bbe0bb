"""MAESTRO tokenized once into compact cached arrays, and the windows training draws from them.

Each split becomes one ``uint16`` array of all its pieces' tokens back to back (each piece starts
with BOS), plus the start index and length in seconds of every piece. The cache lives under
``.cache/phrase/`` and its name carries a hash of the tokenizer settings, so a change of
vocabulary can never read a stale cache.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadenza.atomic import atomic_path
from cadenza.errors import CadenzaError, ConfigError
from cadenza.midifile import MidiFile
from cadenza.models.phrase import tokens as tk

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "phrase"
SPLITS = ("train", "validation", "test")


@dataclass
class TokenSplit:
    tokens: np.ndarray  # (N,) uint16, all pieces concatenated
    starts: np.ndarray  # (P,) int64, index of each piece's BOS
    seconds: np.ndarray  # (P,) float64, length of each piece
    names: list[str]

    def piece(self, i: int) -> np.ndarray:
        end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.tokens)
        return self.tokens[self.starts[i] : end]

    def __len__(self) -> int:
        return len(self.starts)


def maestro_files(root: Path, split: str) -> list[Path]:
    csv_path = Path(root) / "maestro-v2.0.0.csv"
    if not csv_path.is_file():
        raise ConfigError(f"MAESTRO not found: {csv_path} is missing (set data.root / CADENZA_DATA__ROOT)")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return [Path(root) / r["midi_filename"] for r in rows]


# POP909 has no official split: songs 001-809 train, 810-859 validation, 860-909 test.
POP909_SPLITS = {"train": range(1, 810), "validation": range(810, 860), "test": range(860, 910)}


def pop909_files(root: Path, split: str) -> list[Path]:
    if split not in POP909_SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    files = [Path(root) / f"{i:03d}" / f"{i:03d}.mid" for i in POP909_SPLITS[split]]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError(f"POP909 not found under {root} (set data.root / CADENZA_DATA__ROOT)")
    return files


def load_pop909(root: Path, split: str, *, cache_dir: Path = CACHE_DIR, progress: bool = True) -> TokenSplit:
    """Tokens of a POP909 split (melody, bridge and piano tracks as one piano part), cached
    like MAESTRO's."""
    path = Path(cache_dir) / f"pop909-{split}-{_tokenizer_tag()}.npz"
    if path.is_file():
        with np.load(path) as z:
            return TokenSplit(z["tokens"], z["starts"], z["seconds"], list(z["names"]))
    ts = _tokenize(pop909_files(root, split), progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, tokens=ts.tokens, starts=ts.starts, seconds=ts.seconds, names=np.asarray(ts.names))
    return ts


def _tokenizer_tag() -> str:
    spec = f"{tk.QUANTUM_S}|{tk.MAX_SHIFT}|{tk.VELOCITY_BINS}|{tk.VOCAB_SIZE}|{tk.PEDAL_THRESHOLD}|v2"
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def cache_path(split: str, cache_dir: Path = CACHE_DIR) -> Path:
    return Path(cache_dir) / f"maestro-{split}-{_tokenizer_tag()}.npz"


def load_split(root: Path, split: str, *, cache_dir: Path = CACHE_DIR, limit: int | None = None, progress: bool = True) -> TokenSplit:
    """Tokens of one MAESTRO split, from the cache when it is there (built on first use).

    ``limit`` takes the first N pieces (of the cached split, or tokenizes only those when there
    is no cache yet, without writing one).
    """
    path = cache_path(split, cache_dir)
    if path.is_file():
        with np.load(path) as z:
            ts = TokenSplit(z["tokens"], z["starts"], z["seconds"], list(z["names"]))
        return _head(ts, limit) if limit else ts
    files = maestro_files(root, split)
    if limit:
        files = files[:limit]
    ts = _tokenize(files, progress=progress)
    if not limit:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=ts.tokens, starts=ts.starts, seconds=ts.seconds, names=np.asarray(ts.names))
        log.info("cached %s: %d pieces, %d tokens -> %s", split, len(ts), len(ts.tokens), path)
    return ts


def _head(ts: TokenSplit, n: int) -> TokenSplit:
    n = min(n, len(ts))
    end = ts.starts[n] if n < len(ts) else len(ts.tokens)
    return TokenSplit(ts.tokens[:end], ts.starts[:n], ts.seconds[:n], ts.names[:n])


def _tokenize(files: list[Path], *, progress: bool) -> TokenSplit:
    from tqdm import tqdm

    chunks, starts, seconds, names = [], [], [], []
    n = 0
    for f in tqdm(files, desc="tokenizing", unit="file", disable=not progress):
        try:
            perf = MidiFile.load(f).performance
        except CadenzaError as exc:
            log.warning("skipped: %s", exc)
            continue
        toks = tk.encode_performance(perf)
        t_first = float(min(perf.onset.min(initial=np.inf), perf.pedal_t.min(initial=np.inf)))
        chunks.append(toks)
        starts.append(n)
        seconds.append(max(perf.end - t_first, 0.0) if np.isfinite(t_first) else 0.0)
        names.append(f.name)
        n += len(toks)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
    return TokenSplit(tokens, np.asarray(starts, np.int64), np.asarray(seconds, np.float64), names)


def sample_windows(ts: TokenSplit, length: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random windows of ``length`` tokens, each inside one piece (B, length) int64.

    Pieces are drawn in proportion to their length; pieces shorter than a window are skipped.
    """
    ends = np.append(ts.starts[1:], len(ts.tokens))
    room = ends - ts.starts - length
    ok = np.flatnonzero(room > 0)
    if len(ok) == 0:
        raise ConfigError(f"no piece is longer than {length} tokens")
    p = room[ok] / room[ok].sum()
    pieces = rng.choice(ok, size=batch, p=p)
    offs = ts.starts[pieces] + (rng.random(batch) * room[pieces]).astype(np.int64)
    idx = offs[:, None] + np.arange(length)[None, :]
    return ts.tokens[idx].astype(np.int64)


def fixed_windows(ts: TokenSplit, length: int, count: int, seed: int = 0) -> np.ndarray:
    """A fixed, reproducible set of windows (for validation loss)."""
    return sample_windows(ts, length, count, np.random.default_rng(seed))
