"""`cadenza render IN.mid -o OUT.wav`: a MIDI file through FluidSynth into a WAV, offline."""

from __future__ import annotations

import argparse
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
    p.add_argument("--soundfont", metavar="PATH", dest="soundfont", action=_AudioOverride, help="General MIDI .sf2 (default: audio.soundfont, else the OS one)")
    p.add_argument("--sample-rate", metavar="N", dest="sample_rate", type=int, action=_AudioOverride, help="sample rate in Hz (default: audio.sample_rate)")
    p.add_argument("--tail", metavar="SECONDS", type=float, default=1.0, help="seconds after the last event for notes and reverb to ring out (default 1)")
    p.add_argument("--normalize", action="store_true", help="scale the result to a peak of -1 dBFS")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from cadenza.errors import CadenzaError
    from cadenza.stream.audio import render_midi

    if args.tail < 0:
        raise CadenzaError(f"--tail must be 0 or more seconds, not {args.tail}")
    a = settings.audio
    r = render_midi(args.input, args.output, soundfont=a.soundfont, sample_rate=a.sample_rate, tail_s=args.tail, gain=a.gain, normalize=args.normalize)
    print(
        f"{r['path']}: {r['duration_s']:.2f} s at {r['sample_rate']} Hz, {r['events']} events, "
        f"peak {r['peak']:.2f} ({r['gain_db']:+.1f} dB), rendered in {r['render_s']:.2f} s ({r['realtime_factor']:.0f}x real time) with {Path(r['soundfont']).name}"
    )
    return 0
