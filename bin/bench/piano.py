"""`cadenza bench piano`: does the SoundFont's piano show the dynamics Cadenza writes?

Everything Cadenza does to velocities is only as audible as the instrument. A piano sampled at
several velocities gets louder *and brighter* as it is struck harder; a General MIDI set with one
sample per key only gets louder (the velocity scales an attenuation). So for each SoundFont, one
note and one chord are played at a row of velocities through FluidSynth (acoustic grand, channel 1,
dry: reverb and chorus sends at 0, so the room does not blur the attack) and two figures taken:

- ``level_db``: RMS level of the first ``--window`` seconds (note held), dBFS at FluidSynth's gain;
- ``centroid_hz``: spectral centroid of the attack (the first 200 ms, Hann window): brightness.

Both should rise with velocity, and clearly: ``spread_db`` and ``centroid_ratio`` compare velocity
30 with 110, the pair the tests in tests/stream/test_audio.py check.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cadenza.stream.audio import Synth, find_soundfont

VELOCITIES: tuple[int, ...] = (20, 30, 40, 50, 64, 80, 96, 110, 127)
NOTE: tuple[int, ...] = (60,)  # C4
CHORD: tuple[int, ...] = (48, 60, 64, 67)  # C3 C4 E4 G4
ATTACK_S = 0.2
LOW, HIGH = 30, 110  # the pair compared in the summary and in the tests


def register(b) -> None:
    p = b.add_parser("piano", help="level and brightness of the SoundFont's piano against velocity")
    p.add_argument(
        "--soundfont", metavar="PATH", action="append", help="SoundFont to measure; repeat to compare (default: the one `render` uses)"
    )
    p.add_argument(
        "--window", type=float, default=0.5, metavar="SECONDS", help="seconds of the held note the level is taken over (default 0.5)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_piano)


def _silence(synth: Synth) -> None:
    """Release everything and render until no voice sounds and the reverb has died away."""
    synth.all_notes_off()
    for _ in range(200):  # at most 200 blocks of 50 ms
        synth.render(synth.sample_rate // 20)
        if synth.active_voices() == 0:
            break
    synth.render(synth.sample_rate)


def strike(synth: Synth, keys: Sequence[int], velocity: int, seconds: float) -> np.ndarray:
    """Mono audio of ``keys`` struck together at ``velocity`` and held for ``seconds``."""
    _silence(synth)
    for cc in (91, 93):  # reverb and chorus sends off: the instrument, not the room
        synth.handle(bytes((0xB0, cc, 0)))
    for k in keys:
        synth.handle(bytes((0x90, k, velocity)))
    audio = synth.render(int(round(seconds * synth.sample_rate)))
    for k in keys:
        synth.handle(bytes((0x80, k, 0)))
    return audio.mean(axis=1, dtype=np.float64)


def level_db(mono: np.ndarray) -> float:
    """RMS level in dBFS (a full-scale sine reads -3 dB)."""
    rms = float(np.sqrt(np.mean(np.square(mono))))
    return 20 * float(np.log10(max(rms, 1e-12)))


def spectral_centroid(mono: np.ndarray, rate: int) -> float:
    """Magnitude-weighted mean frequency in Hz, Hann window: how bright the sound is."""
    mag = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    freqs = np.fft.rfftfreq(len(mono), 1 / rate)
    return float((freqs * mag).sum() / max(mag.sum(), 1e-12))


def measure(synth: Synth, keys: Sequence[int], velocity: int, *, window_s: float = 0.5) -> dict:
    """Level and attack centroid of one strike (see the module docstring)."""
    mono = strike(synth, keys, velocity, max(window_s, ATTACK_S))
    rate = synth.sample_rate
    return {
        "velocity": velocity,
        "level_db": round(level_db(mono[: int(window_s * rate)]), 2),
        "peak_db": round(20 * float(np.log10(max(float(np.abs(mono).max()), 1e-12))), 2),
        "centroid_hz": round(spectral_centroid(mono[: int(ATTACK_S * rate)], rate), 1),
    }


def _monotonic(values: Sequence[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def _summary(rows: list[dict]) -> dict:
    by_v = {r["velocity"]: r for r in rows}
    levels = [r["level_db"] for r in rows]
    cents = [r["centroid_hz"] for r in rows]
    out = {
        "rows": rows,
        "level_rises": _monotonic(levels),
        "centroid_rises": _monotonic(cents),
        "range_db": round(levels[-1] - levels[0], 2),
    }
    if LOW in by_v and HIGH in by_v:
        out["spread_db"] = round(by_v[HIGH]["level_db"] - by_v[LOW]["level_db"], 2)
        out["centroid_ratio"] = round(by_v[HIGH]["centroid_hz"] / max(by_v[LOW]["centroid_hz"], 1e-9), 2)
    return out


def piano_dynamics(
    soundfont: Path | str | None = None, *, velocities: Sequence[int] = VELOCITIES, sample_rate: int = 44100, window_s: float = 0.5
) -> dict:
    """The measurement for one SoundFont: a single note and a chord at each velocity."""
    t0 = time.perf_counter()
    synth = Synth(soundfont=soundfont, sample_rate=sample_rate)
    load_s = time.perf_counter() - t0
    try:
        result = {
            "soundfont": str(synth.soundfont),
            "size_mb": round(synth.soundfont.stat().st_size / 1e6, 1),
            "load_s": round(load_s, 2),
            "sample_rate": sample_rate,
            "window_s": window_s,
        }
        for name, keys in (("note", NOTE), ("chord", CHORD)):
            result[name] = _summary([measure(synth, keys, v, window_s=window_s) for v in velocities])
    finally:
        synth.close()
    return result


def _piano(args, settings) -> int:
    fonts = args.soundfont or [find_soundfont(settings.audio.soundfont)]
    results = [piano_dynamics(sf, window_s=args.window) for sf in fonts]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))
        return 0
    for r in results:
        print(
            f"{Path(r['soundfont']).name} ({r['size_mb']:g} MB, loaded in {r['load_s']:.2f} s); level over {r['window_s']:g} s, centroid over the first {ATTACK_S * 1000:.0f} ms"
        )
        for name in ("note", "chord"):
            s = r[name]
            print(f"  {name:5} velocity:   " + " ".join(f"{x['velocity']:7d}" for x in s["rows"]))
            print("        level dBFS: " + " ".join(f"{x['level_db']:7.1f}" for x in s["rows"]))
            print("        peak dBFS:  " + " ".join(f"{x['peak_db']:7.1f}" for x in s["rows"]))
            print("        centroid Hz:" + " ".join(f"{x['centroid_hz']:7.0f}" for x in s["rows"]))
            print(
                f"        {LOW} -> {HIGH}: {s.get('spread_db', float('nan')):+.1f} dB, centroid x{s.get('centroid_ratio', float('nan')):.2f}; rises with velocity: level {s['level_rises']}, centroid {s['centroid_rises']}"
            )
    return 0
