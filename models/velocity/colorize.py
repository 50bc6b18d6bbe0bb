"""``cadenza colorize``: new note-on velocities for MIDI files, every other byte kept.

Each file is parsed by the byte-exact reader, its notes go through the chosen model, and only the
note-on velocity bytes are patched (``MidiFile.save_with_velocities``, atomic). A file that cannot
be read gets one line on stderr and no output; the others are still processed and the command
exits non-zero at the end. Files can be spread over worker processes (one torch thread each).
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadenza.errors import CadenzaError, MidiFileError, ModelError
from cadenza.midifile import MidiFile, Performance

MIDI_SUFFIXES = (".mid", ".midi", ".smf", ".kar")


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path


class Colorizer:
    """A loaded model and the mode it runs in: ``causal``, ``lookahead`` (with ``seconds``) or ``offline``."""

    def __init__(self, mode: str, *, seconds: float = 1.0, weights: Path | None = None, context_weights: Path | None = None):
        self.mode, self.seconds = mode, seconds
        self.refiner = None
        if mode == "causal":
            from cadenza.models.velocity.causal import load_causal

            self.model = load_causal(weights)
        elif mode in ("lookahead", "offline"):
            from cadenza.models.velocity.context import load_context

            self.model = load_context(context_weights)
            if mode == "offline":  # the whole piece is known: the bidirectional refiner applies
                from cadenza.models.velocity.refine import load_refiner

                self.refiner = load_refiner(context_weights)
        else:
            raise CadenzaError(f"unknown colorize mode {mode!r} (causal, lookahead, offline)")

    def velocities(self, perf: Performance) -> np.ndarray:
        return self.velocities_many([perf])[0]

    def velocities_many(self, perfs: list[Performance]) -> list[np.ndarray]:
        """Velocities of several pieces at once: their notes share each recurrent step."""
        from cadenza.models.velocity.features import N_FEATURES, causal_features

        feats = [causal_features(p) if len(p) else np.zeros((0, N_FEATURES), np.float32) for p in perfs]
        if self.mode == "causal":
            from cadenza.models.velocity.causal import predict_causal_many

            return predict_causal_many(self.model, feats)
        from cadenza.models.velocity.context import predict_context_many

        sec = math.inf if self.mode == "offline" else self.seconds
        return predict_context_many(
            self.model, feats, [p.onset for p in perfs], [p.offset for p in perfs], [p.pitch for p in perfs], [sec], refiner=self.refiner
        )[0]

    def files(self, jobs: list[Job]) -> list[tuple[Job, int, str | None]]:
        """Colorize a group of files together; a file that fails gets its error, the rest go on."""
        results: dict[int, tuple[Job, int, str | None]] = {}
        loaded: list[tuple[int, MidiFile]] = []
        for i, job in enumerate(jobs):
            try:
                loaded.append((i, MidiFile.load(job.src)))
            except CadenzaError as exc:
                results[i] = (job, 0, str(exc))
        vels = self.velocities_many([mf.performance for _, mf in loaded])
        for (i, mf), v in zip(loaded, vels):
            try:
                mf.save_with_velocities(v, jobs[i].dst)
                results[i] = (jobs[i], len(mf.performance), None)
            except CadenzaError as exc:
                results[i] = (jobs[i], 0, str(exc))
        return [results[i] for i in range(len(jobs))]


def collect_jobs(inputs: list[Path], out: Path) -> list[Job]:
    """Input files/directories -> (source, destination) pairs; directories keep relative names."""
    many = len(inputs) > 1 or any(p.is_dir() for p in inputs)
    if not many:
        src = inputs[0]
        dst = out / src.name if out.is_dir() else out
        return [Job(src, dst)]
    if out.exists() and not out.is_dir():
        raise CadenzaError(f"{out}: several inputs need an output directory, and this is a file")
    jobs: list[Job] = []
    for p in inputs:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MIDI_SUFFIXES)
            if not files:
                print(f"cadenza: warning: {p}: no MIDI files (*.mid, *.midi) in this directory", file=sys.stderr)
            jobs += [Job(f, out / f.relative_to(p)) for f in files]
        else:
            jobs.append(Job(p, out / p.name))
    dsts = [j.dst for j in jobs]
    if len(set(dsts)) != len(dsts):
        raise CadenzaError("two inputs would be written to the same output name; colorize them separately")
    return jobs


# Worker processes keep one Colorizer each (loaded once, in the initializer).
_WORKER: Colorizer | None = None


def _init_worker(mode: str, seconds: float, weights, context_weights) -> None:
    import torch

    global _WORKER
    torch.set_num_threads(1)
    _WORKER = Colorizer(mode, seconds=seconds, weights=weights, context_weights=context_weights)


def _work(jobs: list[Job]) -> list[tuple[Job, int, str | None]]:
    return _WORKER.files(jobs)  # type: ignore[union-attr]


def _groups(jobs: list[Job], workers: int, size: int = 12) -> list[list[Job]]:
    """Files of similar size together (their notes are batched, so little padding), the largest
    groups first (so the last group to finish is a small one), small enough to spread over workers."""

    def nbytes(j: Job) -> int:
        try:
            return j.src.stat().st_size
        except OSError:
            return 0

    size = max(1, min(size, math.ceil(len(jobs) / max(1, 2 * workers)) if workers > 1 else size))
    ordered = sorted(jobs, key=nbytes, reverse=True)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def run_jobs(
    jobs: list[Job], mode: str, *, seconds: float = 1.0, workers: int = 1, weights=None, context_weights=None, progress: bool = True
):
    """Yield ``(job, notes, error_or_None)`` for each job, in completion order."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="file", desc=f"colorize ({mode})", disable=not progress or len(jobs) < 2, file=sys.stderr)
    groups = _groups(jobs, workers)
    pool = None
    try:
        if workers <= 1:
            _init_worker(mode, seconds, weights, context_weights)
            results = map(_work, groups)
        else:
            # Models load in the parent first, so a missing-weights error is one line, not one per worker.
            Colorizer(mode, seconds=seconds, weights=weights, context_weights=context_weights)
            pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(mode, seconds, weights, context_weights))
            results = pool.map(_work, groups, chunksize=1)
        for group in results:
            for r in group:
                bar.update()
                yield r
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def colorize_cli(args, settings) -> int:
    vs = settings.velocity
    seconds = args.lookahead if args.lookahead is not None else (vs.lookahead_s or 1.0)
    if args.lookahead is not None and args.mode != "lookahead":
        raise CadenzaError("--lookahead only applies to --mode lookahead")
    if seconds < 0:
        raise CadenzaError(f"--lookahead must be >= 0 seconds, got {seconds}")
    for p in args.inputs:
        if not p.exists():
            raise MidiFileError(f"{p}: no such file or directory")
    jobs = collect_jobs(list(args.inputs), args.out)
    if args.plot and len(jobs) != 1:
        raise CadenzaError("--plot needs a single input file")
    t0 = time.perf_counter()
    n_ok, n_notes, failed = 0, 0, 0
    workers = args.workers if args.workers else min(os.cpu_count() or 1, 2 if len(jobs) > 4 else 1)
    for _job, notes, err in run_jobs(
        jobs, args.mode, seconds=seconds, workers=workers, weights=vs.weights, context_weights=vs.context_weights
    ):
        if err:
            failed += 1
            from tqdm import tqdm

            tqdm.write(f"cadenza: error: {err}", file=sys.stderr)  # on its own line, not after the bar
        else:
            n_ok += 1
            n_notes += notes
    dt = time.perf_counter() - t0
    if args.plot and n_ok:
        _plot(jobs[0], args.plot, args.mode)
    what = f"{n_ok} file{'s' * (n_ok != 1)}" if len(jobs) > 1 or failed else str(jobs[0].dst)
    print(
        f"colorized {what} ({n_notes} notes, mode {args.mode}{f' {seconds:g} s' if args.mode == 'lookahead' else ''}) in {dt:.1f} s"
        + (f"; {failed} failed" if failed else "")
    )
    return 2 if failed else 0


def _plot(job: Job, png: Path, mode: str) -> None:
    from cadenza.plot import plot_velocity_roll

    src = MidiFile.load(job.src).performance
    out = MidiFile.load(job.dst).performance
    flat = len(src) == 0 or np.all(src.velocity == src.velocity[0])
    plot_velocity_roll(out, png, reference=None if flat else src, title=f"{job.src.name} — colorized ({mode})")


def bench_colorize(args, settings) -> int:
    """Colorize the MAESTRO test split (causal, then offline) into a temporary folder; time it."""
    import json
    import tempfile

    from cadenza.models.velocity.data import maestro_pieces

    root = settings.data.maestro
    files = maestro_pieces(root, "test")[: args.limit]
    res: dict = {"files": len(files), "workers": args.workers, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("causal", "offline"):
            jobs = [Job(f, Path(tmp) / mode / f.name) for f in files]
            t0 = time.perf_counter()
            notes = 0
            for _, n, err in run_jobs(
                jobs,
                mode,
                workers=args.workers,
                progress=not args.json,
                weights=settings.velocity.weights,
                context_weights=settings.velocity.context_weights,
            ):
                if err:
                    raise ModelError(err)
                notes += n
            dt = time.perf_counter() - t0
            res[mode] = {"seconds": round(dt, 2), "notes": notes, "notes_per_s": round(notes / dt)}
    if args.json:
        print(json.dumps(res))
    else:
        for mode in ("causal", "offline"):
            r = res[mode]
            print(
                f"colorize {mode:8s} {res['files']} MAESTRO test files, {r['notes']} notes: {r['seconds']:.1f} s "
                f"({r['notes_per_s']} notes/s, {res['workers']} worker processes, {res['cpus']} CPUs)"
            )
    return 0
