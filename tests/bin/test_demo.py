"""`cadenza demo --fast` end to end: shipped excerpt, shipped weights, live engine, all files."""

from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np
import pytest

from cadenza.midifile import MidiFile

pytestmark = [pytest.mark.fluidsynth, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = subprocess.run(
        [sys.executable, "-m", "cadenza", "--log-level", "warning", "demo", "--fast", "--out", str(out), "--continue-seconds", "6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_demo_writes_every_file(demo_out):
    out, stdout = demo_out
    for name in ("input_flat.mid", "colorized.mid", "continuation.mid", "result.wav", "flat.wav", "pianoroll.png", "summary.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert (out / "pianoroll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "notes processed:        128" in stdout
    assert "flat.wav (velocity 64) at" in stdout and "result.wav flat.wav pianoroll.png" in stdout
    assert stdout == (out / "summary.txt").read_text()


def test_colorized_keeps_the_notes_and_changes_velocities(demo_out):
    out, _ = demo_out
    flat = MidiFile.load(out / "input_flat.mid").performance
    col = MidiFile.load(out / "colorized.mid").performance
    assert set(flat.velocity.tolist()) == {64}
    assert np.array_equal(flat.onset, col.onset) and np.array_equal(flat.pitch, col.pitch) and np.array_equal(flat.offset, col.offset)
    assert col.velocity.std() > 3 and col.velocity.min() >= 1 and col.velocity.max() <= 127


def test_continuation_and_audio(demo_out):
    out, _ = demo_out
    cont = MidiFile.load(out / "continuation.mid").performance
    assert len(cont) > 0 and cont.end <= 6.0 + 0.05
    flat = MidiFile.load(out / "input_flat.mid").performance
    with wave.open(str(out / "result.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    # excerpt + silence before the answer + answer + render tail, give or take
    assert flat.end + 1.0 < seconds < flat.end + 6.0 + 4.0
    assert np.abs(audio).max() > 1000


def read_wav(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2) / 32768.0, w.getframerate()


def test_flat_wav_is_the_excerpt_at_velocity_64_as_loud_as_the_result(demo_out):
    from cadenza.stream.loudness import LoudnessMeter

    out, _ = demo_out
    flat_end = MidiFile.load(out / "input_flat.mid").performance.end
    loudness = {}
    for name in ("flat.wav", "result.wav"):
        audio, rate = read_wav(out / name)
        assert 0.5 < np.abs(audio).max() <= 10 ** (-0.9 / 20), name  # normalized, not clipped
        meter = LoudnessMeter(rate)
        meter.add(audio)
        loudness[name] = meter.integrated
        if name == "flat.wav":
            assert flat_end < len(audio) / rate < flat_end + 2.0  # the excerpt alone, no continuation
    # Matched, unless velocity 64 would have to peak above -1 dBFS to be as loud (then it is quieter).
    assert loudness["flat.wav"] == pytest.approx(loudness["result.wav"], abs=0.2) or (
        loudness["flat.wav"] < loudness["result.wav"] and np.abs(read_wav(out / "flat.wav")[0]).max() > 10 ** (-1.1 / 20)
    )


def test_demo_without_a_soundfont_fails_at_once_in_one_line(tmp_path):
    import os

    env = dict(os.environ, CADENZA_AUDIO__SOUNDFONT=str(tmp_path / "missing.sf2"))
    r = subprocess.run(
        [sys.executable, "-m", "cadenza", "demo", "--fast", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.sf2" in lines[0] and "not found" in lines[0], r.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
