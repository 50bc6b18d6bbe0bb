"""`cadenza demo`: the embedded default — no ports, no devices, no data set, no download.

A shipped 40 s excerpt of a MAESTRO performance loses its velocities and is streamed through the
same live engine `serve` runs (file source → causal colorize → continuation after the phrase →
recorder, and the sound card too with ``--audio``). Written to the output folder:
``input_flat.mid``, ``colorized.mid``, ``continuation.mid``, ``result.wav``, ``flat.wav`` (the
excerpt at velocity 64, to hear what the colorizer changed), ``pianoroll.png`` and ``summary.txt``.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
from pathlib import Path

import numpy as np

from cadenza.errors import CadenzaError


def register(groups) -> None:
    p = groups["root"].add_parser("demo", help="colorize and continue a shipped piano excerpt through the live engine")
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default demo-out/)")
    p.add_argument("--fast", action="store_true", help="run as fast as possible instead of in real time")
    p.add_argument("--audio", action="store_true", help="also play through the sound card while it runs")
    p.add_argument("--continue-seconds", type=float, default=6.0, help="length of the continuation (default 6)")
    p.add_argument("--input", metavar="MIDI", help="use this file instead of the shipped excerpt")
    p.set_defaults(func=run)


def excerpt_path() -> Path:
    return Path(str(importlib.resources.files("cadenza") / "assets" / "demo_excerpt.mid"))


def run(args, settings) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    summary = asyncio.run(
        _demo(
            settings,
            Path(args.input) if args.input else excerpt_path(),
            out,
            realtime=not args.fast,
            audio=args.audio,
            seconds=args.continue_seconds,
        )
    )
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    text = _summary_text(summary)
    from cadenza.atomic import write_atomic

    write_atomic(out / "summary.txt", text.encode())
    print(text, end="")
    return 0


async def _demo(settings, source_path: Path, out: Path, *, realtime: bool, audio: bool, seconds: float) -> dict:
    from cadenza.midifile import MidiFile, write_performance
    from cadenza.stream.audio import find_soundfont, midi_file_events, render_events
    from cadenza.stream.build import build_engine
    from cadenza.stream.sinks.record import Recorder, events_to_performance
    from cadenza.stream.sources import FileSource

    find_soundfont(settings.audio.soundfont)  # the WAV needs one: fail now, not after the run
    midi = MidiFile.load(source_path)
    original = midi.performance
    if len(original) == 0:
        raise CadenzaError(f"{source_path}: no notes to play")
    flat_path = out / "input_flat.mid"
    midi.save_with_velocities(np.full(len(original), 64), flat_path)
    events, _ = midi_file_events(flat_path)

    loop = asyncio.get_running_loop()
    settings = settings.model_copy(deep=True)
    settings.phrase.length_mode = "seconds"
    settings.phrase.response_seconds = seconds
    # In real time the demo keeps the live deadline (3 ms by default). --fast pushes the whole
    # excerpt through as fast as the loop can take it, so a note's "deadline" there would only
    # measure the backlog; it gets 100 ms, and the summary says which deadline was used.
    settings.velocity.deadline_ms = settings.velocity.deadline_ms if realtime else 100.0
    recorder = Recorder()
    audio_sink = None
    audio_report = None
    if audio:
        from cadenza.stream.sinks.audio import AudioSink

        audio_sink = AudioSink(settings.audio)
    try:
        async with build_engine(
            settings, "both", [recorder] + ([audio_sink] if audio_sink else []), realtime=realtime, loop=loop
        ) as engine:
            cr = engine.phrase
            run_task = asyncio.create_task(engine.run())
            try:
                t_first = loop.time()
                end_t = await FileSource(events, realtime=realtime).play(engine)
                await engine.drain()
                if not realtime:
                    await cr.worker.caught_up()
                    cr.end_call(end_t + settings.phrase.silence_ms / 1000)
                # Wait for the phrase end, the response, and its last note.
                await _wait_until(lambda: cr.state == 0 and recorder_has_response(recorder), timeout=seconds + 30)
            finally:
                engine.stop()
                await run_task
    finally:
        if audio_sink is not None:
            audio_report = audio_sink.latency_report()
            audio_sink.close()

    # ---- files ------------------------------------------------------------------------------
    vel = recorder.performer_velocities()
    if len(vel) != len(original):
        raise CadenzaError(f"demo: {len(vel)} notes came out for {len(original)} in")
    midi_flat = MidiFile.load(flat_path)
    midi_flat.save_with_velocities(np.asarray(vel), out / "colorized.mid")
    response_tags = {tag for _, _, tag in recorder.events if isinstance(tag, int)}
    # A pause inside the excerpt may have drawn an answer the music then cut short; the
    # continuation is the answer to the whole excerpt, the last one.
    cont = recorder.timed(tags={max(response_tags)})
    first_t = min(t for t, d in cont) if cont else 0.0
    cont_perf = events_to_performance([(t - first_t, d) for t, d in cont])
    write_performance(cont_perf, out / "continuation.mid")
    everything = recorder.timed(tags={None, *response_tags, "release", "panic"}, origin=t_first)
    wav = render_events(everything, out / "result.wav", soundfont=settings.audio.soundfont, normalize=True)
    # The A/B is fair only at equal loudness (the louder one sounds better), and velocity 64 is
    # louder on average than most playing: flat.wav is matched to result.wav's loudness, so what
    # differs is how the dynamics move, not the volume knob (stream/loudness.py).
    flat_wav = render_events(events, out / "flat.wav", soundfont=settings.audio.soundfont, normalize=True, loudness=wav["loudness_lufs"])
    colorized = original.with_velocity(np.asarray(vel))
    try:
        from cadenza.plot import plot_velocity_roll

        plot_velocity_roll(
            colorized, out / "pianoroll.png", reference=original, title=f"{source_path.name}: model (top) vs performer (bottom)"
        )
    except ImportError:  # plotting is optional at run time (matplotlib)
        pass

    snap = engine.metrics.snapshot()
    lat = snap["latency"]
    err = np.abs(np.asarray(vel, float) - original.velocity)
    return {
        "source": source_path.name,
        "mode": "real time" if realtime else "fast",
        "notes": len(original),
        "internal": lat.get("internal", {}),
        "model": lat.get("model", {}),
        "deadline_misses": snap["counters"].get("deadline_miss", 0),
        "deadline_ms": settings.velocity.deadline_ms,
        "dropped": snap["counters"].get("dropped", 0),
        "ttfn": lat.get("ttfn", {}),
        "continuation_notes": len(cont_perf),
        "continuation_seconds": round(float(cont_perf.end), 2) if len(cont_perf) else 0.0,
        "mae_vs_performer": round(float(err.mean()), 2),
        "velocity_sd": round(float(np.std(vel)), 2),
        "wav_seconds": wav["duration_s"],
        "wav_lufs": round(wav["loudness_lufs"], 1),
        "flat_lufs": round(flat_wav["loudness_lufs"], 1),
        "audio_latency": audio_report,
        "out": str(out),
    }


def recorder_has_response(recorder) -> bool:
    return any(isinstance(tag, int) for _, _, tag in recorder.events)


async def _wait_until(pred, timeout: float) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > end:
            raise CadenzaError("demo: the continuation did not finish in time")
        await asyncio.sleep(0.02)


def _summary_text(s: dict) -> str:
    from cadenza.stream.serve import format_audio_latency

    i, ttfn = s["internal"], s["ttfn"]
    lines = [
        f"Cadenza demo ({s['mode']}): {s['source']}",
        f"notes processed:        {s['notes']}",
        f"latency (in -> out):    p50 {i.get('p50_ms', float('nan')):.2f} ms, p99 {i.get('p99_ms', float('nan')):.2f} ms",
        f"deadline misses:        {s['deadline_misses']} at a {s['deadline_ms']:g} ms deadline (dropped {s['dropped']})",
        f"velocity vs performer:  MAE {s['mae_vs_performer']:.2f}, SD of colorized velocities {s['velocity_sd']:.1f}",
        f"continuation:           {s['continuation_notes']} notes over {s['continuation_seconds']:.1f} s, first note {ttfn.get('p50_ms', float('nan')):.1f} ms after the phrase ended",
        f"audio:                  result.wav, {s['wav_seconds']:.1f} s at {s['wav_lufs']:.1f} LUFS; flat.wav (velocity 64) at {s['flat_lufs']:.1f} LUFS",
        *([f"sound card:             {format_audio_latency(s['audio_latency'])}"] if s.get("audio_latency") else []),
        f"files in {s['out']}/:   input_flat.mid colorized.mid continuation.mid result.wav flat.wav pianoroll.png summary.txt",
        f"wall time:              {s['wall_s']} s",
    ]
    return "\n".join(lines) + "\n"
