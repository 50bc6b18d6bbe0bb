"""`cadenza eval phrase --files DIR`: the phrase model's NLL on any folder of performances.

Every readable MIDI file under the folder is tokenized as training data is and scored as
``eval phrase --split`` scores a split (windows of the context length overlapping by
``evaluate.OVERLAP`` tokens); an unreadable file costs one line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cadenza.errors import CadenzaError, ConfigError
from cadenza.midifile import MidiFile
from cadenza.models.phrase import tokens as tk


def files_nll(folder: Path, *, weights: Path | None, threads: int = 1, progress: bool = True) -> dict:
    from tqdm import tqdm

    from cadenza.models.evaluation.midi import midi_files
    from cadenza.models.phrase.evaluate import model_log_probs
    from cadenza.models.phrase.model import load_phrase

    torch.set_num_threads(threads)
    model = load_phrase(weights)
    nll, count, secs, files, skipped = 0.0, 0, 0.0, 0, []
    for path in tqdm(midi_files(folder), desc="scoring", unit="file", disable=not progress, leave=False):
        try:
            perf = MidiFile.load(path).performance
        except CadenzaError as exc:
            print(f"cadenza: skipped {exc}", file=sys.stderr)
            skipped.append(str(path))
            continue
        piece = tk.encode_performance(perf)
        if len(piece) < 2:
            continue
        nll -= float(model_log_probs(model, piece).sum())
        count += len(piece) - 1
        t_first = float(min(perf.onset.min(initial=np.inf), perf.pedal_t.min(initial=np.inf)))
        secs += max(perf.end - t_first, 0.0)
        files += 1
    if not count:
        raise ConfigError(f"{folder}: no readable performance to score")
    return {
        "folder": str(folder),
        "files": files,
        "skipped": skipped,
        "tokens": count,
        "music_seconds": round(secs, 2),
        "nll_per_token": nll / count,
        "nll_per_second": nll / secs if secs else None,
    }


def format_files(r: dict) -> str:
    per_s = f"{r['nll_per_second']:.2f}" if r["nll_per_second"] is not None else "-"
    skipped = f" ({len(r['skipped'])} skipped)" if r["skipped"] else ""
    return (
        f"{r['folder']}: {r['files']} files, {r['tokens']:,} tokens, {r['music_seconds']:.0f} s of music{skipped}\n"
        f"NLL per token {r['nll_per_token']:.4f} nats, per second {per_s}"
    )
