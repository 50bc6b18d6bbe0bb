"""`cadenza render IN.mid -o OUT.wav`: a MIDI file through FluidSynth into a WAV, offline."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class _AudioOverride(argparse.Action):
    """Store the flag as an ``audio.*`` config override, so it is validated like the config file."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from cadenza.cli import add_override

        add_override(namespace, "audio", self.dest, values)


def register(groups) -> None:
    p = groups["root"].add_parser("render", help="render a MIDI file to WAV through FluidSynth (offline, faster than real time)")
    p.add_argument("input", metavar="IN.mid", type=Path, help="MIDI file to render")
    p.add_argument("-o", "--output", metavar="OUT.wav", type=Path, required=True, help="WAV file to write (16-bit stereo)")
    p.add_argument(
        "--soundfont",
        metavar="PATH",
        dest="soundfont",
        action=_AudioOverride,
        help="General MIDI .sf2 or .sf3 (default: audio.soundfont, else the OS one)",
    )
    p.add_argument(
        "--sample-rate",
        metavar="N",
        dest="sample_rate",
        type=int,
        action=_AudioOverride,
        help="sample rate in Hz (default: audio.sample_rate)",
    )
    p.add_argument(
        "--tail",
        metavar="SECONDS",
        type=float,
        default=1.0,
        help="seconds after the last event for notes and reverb to ring out (default 1)",
    )
    # On by default: at FluidSynth's own level a piano renders far below full scale (stream/audio.py, NORMALIZE_PEAK).
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scale the result to a peak of -1 dBFS (default; --no-normalize keeps the synth's level)",
    )
    p.add_argument(
        "--loudness",
        metavar="LUFS",
        type=float,
        help="with --normalize, aim at this integrated loudness instead (e.g. -18 to match another rendering), the peak still at most -1 dBFS",
    )
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from cadenza.errors import CadenzaError
    from cadenza.stream.audio import render_midi

    if args.tail < 0:
        raise CadenzaError(f"--tail must be 0 or more seconds, not {args.tail}")
    if args.loudness is not None and (not args.normalize or not math.isfinite(args.loudness)):
        raise CadenzaError("--loudness needs --normalize and a finite level in LUFS, e.g. -18")
    a = settings.audio
    r = render_midi(
        args.input,
        args.output,
        soundfont=a.soundfont,
        sample_rate=a.sample_rate,
        tail_s=args.tail,
        gain=a.gain,
        normalize=args.normalize,
        loudness=args.loudness,
    )
    print(
        f"{r['path']}: {r['duration_s']:.2f} s at {r['sample_rate']} Hz, {r['events']} events, "
        f"peak {20 * math.log10(max(r['peak'], 1e-9)):.1f} dBFS, {r['loudness_lufs']:.1f} LUFS ({r['gain_db']:+.1f} dB), rendered in {r['render_s']:.2f} s ({r['realtime_factor']:.0f}x real time) with {Path(r['soundfont']).name}"
    )
    return 0
