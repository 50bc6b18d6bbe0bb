"""`cadenza eval midi`: statistics of folders of MIDI files against a reference.

Each folder is read file by file (a file that does not parse costs one line on stderr, never the
run); its notes are pooled into :class:`~cadenza.models.evaluation.stats.SetStats` and compared
with the reference set: MAESTRO test when the data is there, else the statistics shipped in
``models/weights/maestro_test_stats.json`` (made by this module from MAESTRO test, see
:func:`maestro_reference`), or any folder / statistics JSON given with ``--reference``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cadenza.errors import CadenzaError, ConfigError
from cadenza.midifile import MidiFile, Performance
from cadenza.models.evaluation.stats import FEATURES, SetStats, compare

SHIPPED_REFERENCE = Path(__file__).resolve().parent.parent / "weights" / "maestro_test_stats.json"
MIDI_SUFFIXES = (".mid", ".midi", ".smf")


@dataclass
class Collected:
    """One set's statistics, an example performance for the pictures, and what was skipped."""

    stats: SetStats
    example: Performance | None = None
    example_name: str = ""
    skipped: list[str] = field(default_factory=list)


def midi_files(folder: Path) -> list[Path]:
    """MIDI files under ``folder`` (recursively, sorted); a single file is itself."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())


def collect(name: str, files: Iterable[Path], *, progress: bool = True, warn: Callable[[str], None] | None = None) -> Collected:
    """Read every file (one ``warn`` line per unreadable one) into one set's statistics."""
    from tqdm import tqdm

    warn = warn or (lambda line: print(line, file=sys.stderr))
    files = list(files)
    out = Collected(SetStats(name))
    for path in tqdm(files, desc=name, unit="file", disable=not progress, leave=False):
        try:
            perf = MidiFile.load(path).performance
        except CadenzaError as exc:
            out.skipped.append(str(path))
            warn(f"cadenza: skipped {exc}")
            continue
        except Exception as exc:  # noqa: BLE001  a parser bug on one odd file must not end a long run
            out.skipped.append(str(path))
            warn(f"cadenza: skipped {path}: {type(exc).__name__}: {exc}")
            continue
        out.stats.add(perf)
        if out.example is None and len(perf):
            out.example, out.example_name = perf, path.name
    return out


def collect_performances(name: str, perfs: Iterable[Performance]) -> Collected:
    """The same for performances in memory (e.g. a model's answers in ``eval phrase``)."""
    out = Collected(SetStats(name))
    for perf in perfs:
        out.stats.add(perf)
        if out.example is None and len(perf):
            out.example, out.example_name = perf, f"{name} #1"
    return out


def maestro_reference(maestro_root: Path, *, progress: bool = True) -> SetStats:
    """MAESTRO test (the official split) as one set."""
    from cadenza.models.phrase.data import maestro_files

    return collect("MAESTRO test", maestro_files(maestro_root, "test"), progress=progress).stats


def load_stats(path: Path) -> SetStats:
    try:
        return SetStats.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a statistics file of this version ({exc})") from None


def reference(ref: Path | None, maestro_root: Path | None, *, progress: bool = True) -> SetStats:
    """``ref`` (a folder or a statistics JSON); default MAESTRO test, else the shipped stats."""
    if ref is not None:
        if Path(ref).suffix.lower() == ".json":
            return load_stats(ref)
        c = collect(Path(ref).name or str(ref), midi_files(Path(ref)), progress=progress)
        if not c.stats.notes:
            raise ConfigError(f"{ref}: no readable notes to compare with")
        return c.stats
    if maestro_root is not None and (Path(maestro_root) / "maestro-v2.0.0.csv").is_file():
        return maestro_reference(Path(maestro_root), progress=progress)
    return load_stats(SHIPPED_REFERENCE)


def evaluate_sets(ref: SetStats, sets: list[Collected]) -> dict:
    """The JSON result: reference summary, and per set its summary and closeness to the reference."""
    return {
        "reference": {"name": ref.name, **ref.summary()},
        "sets": {c.stats.name: {**c.stats.summary(), "skipped": c.skipped, "vs_reference": compare(ref, c.stats)} for c in sets},
        "features": list(FEATURES),
    }


def format_table(result: dict) -> str:
    """Overlap (and KL) per feature, one column per set: the terminal form of report.md's table."""
    names = list(result["sets"])
    w = max([12, *(len(n) + 2 for n in names)])
    lines = [
        f"against {result['reference']['name']} ({result['reference']['files']} files, {result['reference']['notes']:,} notes); "
        "overlap (1 = same distribution) / KL(reference || set) nats"
    ]
    lines.append(f"{'':14}" + "".join(f"{n:>{w}}" for n in names))
    for k in (*FEATURES, "mean"):
        cells = []
        for n in names:
            v = result["sets"][n]["vs_reference"][k]
            cells.append(f"{v['overlap']:.3f}/{v['kl']:.2f}" if v["kl"] is not None else f"{v['overlap']:.3f}/-")
        lines.append(f"{k:14}" + "".join(f"{c:>{w}}" for c in cells))
    lines.append(f"{'files':14}" + "".join(f"{result['sets'][n]['files']:>{w}}" for n in names))
    lines.append(f"{'notes':14}" + "".join(f"{result['sets'][n]['notes']:>{w},}" for n in names))
    return "\n".join(lines)
