"""File commands: `cadenza vae sample|interpolate|vary|reconstruct|attribute`.

Every output is a one-track MIDI file at the input's tempo (or --bpm), written to a temporary file
in the same folder and moved into place, so no half-written file is ever left under its name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cadenza.errors import ConfigError, MidiFileError, OutputError

from .data import file_melody, write_midi


def _load(args):
    from .live import VAE
    from .weights import load_model

    model, meta, attrs = load_model(args.weights if getattr(args, "weights", None) else args.model)
    return VAE(model, meta, attrs)


def _check_n(n: int, least: int = 1) -> None:
    if n < least:
        raise ConfigError(f"-n must be at least {least}")


def _out_dir(d: Path) -> Path:
    if d.exists() and not d.is_dir():
        raise OutputError(f"{d}: exists and is not a folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{d}: cannot create the folder ({exc.strerror})") from None
    return d


def _melody(vae, path: Path):
    ext = file_melody(path, vae.cfg.n_bars)
    if ext.first_bar != 1:
        print(f"{path}: using bars {ext.first_bar}-{ext.first_bar + vae.cfg.n_bars - 1}", file=sys.stderr)
    return ext


def _write(path: Path, ev, bpm: float, shift: int = 0) -> None:
    """Write ``ev`` back in the input's register (undoing the octave move into the model's range)."""
    write_midi(path, ev, bpm=bpm, transpose=-shift)


def run(args) -> int:
    op = args.op
    if op == "sample":
        _check_n(args.n)
        if args.temperature < 0:
            raise ConfigError("--temperature must be >= 0")
        vae = _load(args)
        rng = np.random.default_rng(args.seed)
        d = _out_dir(args.output)
        for i in range(args.n):
            ev = vae.decode(vae.sample_z(rng), args.temperature, seed=int(rng.integers(1 << 31)))
            write_midi(d / f"sample_{i + 1:03d}.mid", ev, bpm=args.bpm)
        print(f"wrote {args.n} samples of {vae.cfg.n_bars} bars to {d}")
        return 0
    if op == "interpolate":
        _check_n(args.n, 2)
        vae = _load(args)
        a, b = _melody(vae, args.a), _melody(vae, args.b)
        za, zb = vae.encode_steps(a.events), vae.encode_steps(b.events)
        d = _out_dir(args.output)
        for k in range(args.n):
            ev = vae.decode(vae.morph(za, zb, k, args.n - 1), 0.0)
            write_midi(d / f"interp_{k + 1:03d}.mid", ev, bpm=args.bpm or a.bpm)
        print(f"wrote {args.n} melodies from {args.a.name} to {args.b.name} in {d}")
        return 0
    if op == "vary":
        _check_n(args.n)
        if args.amount < 0:
            raise ConfigError("--amount must be >= 0")
        vae = _load(args)
        m = _melody(vae, args.input)
        rng = np.random.default_rng(args.seed)
        d = _out_dir(args.output)
        for i in range(args.n):
            _write(d / f"{args.input.stem}_var{i + 1:03d}.mid", vae.vary(m.events, args.amount, rng), args.bpm or m.bpm, m.octave_shift)
        print(f"wrote {args.n} variations of {args.input.name} to {d}")
        return 0
    if op == "attribute":
        vae = _load(args)
        if args.attribute not in vae.attrs:
            from cadenza.errors import ModelError

            raise ModelError(f"{vae.cfg.name} weights carry no attribute vector {args.attribute!r} (run `cadenza eval vae` after training)")
        if args.output.suffix.lower() not in (".mid", ".midi"):
            raise OutputError(f"{args.output}: the output must be a .mid file")
        m = _melody(vae, args.input)
        z = vae.apply_attribute(vae.encode_steps(m.events), args.attribute, args.amount)
        _write(args.output, vae.decode(z, 0.0), args.bpm or m.bpm, m.octave_shift)
        print(f"wrote {args.output} ({args.attribute} {args.amount:+g})")
        return 0
    if op == "reconstruct":
        return _reconstruct(args)
    raise ConfigError(f"unknown vae command {op}")


def _reconstruct(args) -> int:
    from tqdm import tqdm

    ins: list[tuple[Path, Path]] = []
    out = args.output
    many = len(args.inputs) > 1 or any(p.is_dir() for p in args.inputs)
    for p in args.inputs:
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.suffix.lower() in (".mid", ".midi") and q.is_file())
            ins += [(q, out / q.relative_to(p)) for q in files]
        elif many:
            ins.append((p, out / p.name))
        else:
            ins.append((p, out if out.suffix.lower() in (".mid", ".midi") else out / p.name))
    if not ins:
        raise MidiFileError("no MIDI files (.mid) in " + ", ".join(str(p) for p in args.inputs))
    if many and out.suffix.lower() in (".mid", ".midi"):
        raise OutputError(f"{out}: several inputs need an output folder, not a file")
    vae = _load(args)
    bad = done = 0
    acc = []
    for src, dst in tqdm(ins, desc="reconstruct", disable=args.no_progress or len(ins) < 2, file=sys.stderr):
        try:
            m = file_melody(src, vae.cfg.n_bars)
            ev = vae.decode(vae.encode_steps(m.events), 0.0)
            _write(dst, ev, args.bpm or m.bpm, m.octave_shift)
            acc.append(float(np.mean(ev == m.events)))
            done += 1
        except (MidiFileError, OutputError) as exc:
            bad += 1
            tqdm.write(f"cadenza: error: {exc}", file=sys.stderr)
    mean = f", mean step accuracy {np.mean(acc):.3f}" if acc else ""
    print(f"reconstructed {done} of {len(ins)} files with {vae.cfg.name}{mean}" + (f"; {bad} failed" if bad else ""))
    return 2 if bad else 0
