"""Audio: real FluidSynth with the OS SoundFont, real PortAudio on a private JACK dummy server."""

from __future__ import annotations

import importlib.resources
import time
import wave

import mido
import numpy as np
import pytest

from cadenza.cli import main
from cadenza.config.settings import AudioSettings
from cadenza.errors import AudioError, MidiFileError
from cadenza.midifile import MidiFile
from cadenza.stream.audio import find_soundfont, render_events, render_midi

RATE = 22050  # enough for the checks, half the work


def read_wav(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 2 and w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        return data.astype(np.float32) / 32768.0, w.getframerate()


def first_sound(audio: np.ndarray, rate: int, threshold: float = 1e-3) -> float:
    loud = np.flatnonzero(np.abs(audio).max(axis=1) > threshold)
    return loud[0] / rate if len(loud) else float("inf")


def two_tempo_midi(path) -> float:
    """A note at beat 1, with the tempo doubled at beat 0: it starts at 0.25 s, not 0.5 s."""
    mid = mido.MidiFile(ticks_per_beat=480)
    tr = mido.MidiTrack()
    tr += [
        mido.MetaMessage("set_tempo", tempo=250_000, time=0),
        mido.Message("program_change", program=0, time=0),
        mido.Message("control_change", control=64, value=127, time=240),
        mido.Message("note_on", note=60, velocity=100, time=240),
        mido.Message("note_on", note=64, velocity=90, time=0),
        mido.Message("pitchwheel", pitch=1000, time=240),
        mido.Message("note_off", note=60, velocity=0, time=480),
        mido.Message("note_off", note=64, velocity=0, time=0),
        mido.Message("control_change", control=64, value=0, time=240),
        mido.MetaMessage("end_of_track", time=0),
    ]
    mid.tracks.append(tr)
    mid.save(path)
    return mid.length


@pytest.mark.fluidsynth
def test_render_matches_midi_length_and_timing(tmp_path):
    src = tmp_path / "two_tempo.mid"
    length = two_tempo_midi(src)
    assert length == pytest.approx(0.75)
    report = render_midi(src, tmp_path / "out.wav", sample_rate=RATE, tail_s=0.5)
    audio, rate = read_wav(tmp_path / "out.wav")
    assert rate == RATE
    assert len(audio) == report["frames"]
    assert abs(len(audio) - (length + 0.5) * RATE) <= 1  # sample-exact, not just within a block
    assert first_sound(audio, rate) == pytest.approx(0.25, abs=0.01)  # tempo map applied
    assert np.sqrt(np.mean(audio[int(0.3 * rate) : int(0.6 * rate)] ** 2)) > 1e-3  # the chord sounds
    assert report["events"] == 8 and report["peak"] > 0.01


@pytest.mark.fluidsynth
def test_render_events_plays_program_changes_and_normalizes(tmp_path):
    note = [(0.0, bytes([0x90, 60, 100])), (0.1, b"\xf8"), (0.5, bytes([0x80, 60, 0]))]  # clock: not for a synth
    piano = render_events(note, tmp_path / "piano.wav", sample_rate=RATE, tail_s=0.2)
    violin = render_events([(0.0, bytes([0xC0, 40]))] + note, tmp_path / "violin.wav", sample_rate=RATE, tail_s=0.2, normalize=True)
    a, _ = read_wav(tmp_path / "piano.wav")
    b, _ = read_wav(tmp_path / "violin.wav")
    assert a.shape == b.shape == (round(0.7 * RATE), 2)
    assert violin["peak"] == pytest.approx(10 ** (-1 / 20), abs=0.01)
    assert piano["peak"] < 0.5  # not normalized: the synth's own level
    assert piano["events"] == 2 and violin["events"] == 3
    # A different instrument, not just a louder piano.
    assert np.corrcoef(a[:, 0] / np.abs(a).max(), b[:, 0] / np.abs(b).max())[0, 1] < 0.5


def test_missing_soundfont_is_a_clear_error(tmp_path):
    with pytest.raises(AudioError, match="no General MIDI SoundFont found.*apt-get install timgm6mb-soundfont"):
        find_soundfont(None, candidates=[str(tmp_path / "none.sf2"), str(tmp_path / "*.sf2")])
    with pytest.raises(AudioError, match="not found"):
        find_soundfont(tmp_path / "mine.sf2")
    (tmp_path / "b.sf2").write_bytes(b"x")
    assert find_soundfont(None, candidates=[str(tmp_path / "none.sf2"), str(tmp_path / "*.sf2")]) == tmp_path / "b.sf2"


@pytest.mark.fluidsynth
def test_render_cli_rejects_corrupt_midi_and_missing_soundfont(tmp_path, capfd):
    good = tmp_path / "good.mid"
    two_tempo_midi(good)
    bad = tmp_path / "bad.mid"
    bad.write_bytes(good.read_bytes()[:-9])  # truncated track
    out = tmp_path / "out" / "x.wav"
    with pytest.raises(MidiFileError):
        render_midi(bad, out)
    assert main(["render", str(bad), "-o", str(out)]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("cadenza: error:") and "bad.mid" in err and "\n" not in err
    assert main(["render", str(good), "-o", str(out), "--soundfont", str(tmp_path / "no.sf2")]) == 2
    assert "SoundFont" in capfd.readouterr().err
    junk = tmp_path / "junk.sf2"
    junk.write_bytes(b"RIFF" + bytes(100))
    assert main(["render", str(good), "-o", str(out), "--soundfont", str(junk)]) == 2
    err = capfd.readouterr().err  # fd level: C libraries must not print around the one line
    assert "not a usable SoundFont" in err and err.count("\n") == 1
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))  # no half-written file
    assert main(["render", str(good), "-o", str(out), "--sample-rate", str(RATE)]) == 0
    assert "real time" in capfd.readouterr().out and out.is_file()


@pytest.mark.fluidsynth
def test_wav_sink_renders_what_it_was_sent(tmp_path):
    from cadenza.stream.audio import WavSink

    now = [10.0]
    sink = WavSink(tmp_path / "live.wav", audio=AudioSettings(sample_rate=RATE), clock=lambda: now[0], tail_s=0.25, normalize=True)
    for t, msg in [(10.0, [0xB0, 64, 127]), (10.2, [0x90, 67, 80]), (10.8, [0x80, 67, 0]), (11.0, [0xB0, 64, 0])]:
        now[0] = t
        sink.send(bytes(msg))
    sink.close()
    sink.close()
    audio, rate = read_wav(tmp_path / "live.wav")
    assert len(audio) == round(1.25 * RATE)
    assert first_sound(audio, rate) == pytest.approx(0.2, abs=0.01)
    assert sink.report["peak"] == pytest.approx(np.abs(audio).max(), abs=1e-3) == pytest.approx(0.89, abs=0.01)


@pytest.mark.jack
@pytest.mark.fluidsynth
def test_audio_sink_plays_on_jack_and_reports_latency(jack_server):
    from cadenza.stream.audio import AudioSink

    with pytest.raises(AudioError, match="not found; available"):
        AudioSink(AudioSettings(device="no such sound card"))
    sink = AudioSink(AudioSettings(block_size=128))
    try:
        assert "JACK" in sink.host_api and sink.sample_rate == jack_server.rate
        sink.send(bytes([0x90, 60, 100]))
        deadline = time.monotonic() + 5
        while sink.synth.active_voices() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.synth.active_voices() > 0  # the audio callback applied the note
        sink.send(bytes([0x80, 60, 0]))
        time.sleep(0.1)
        rep = sink.latency_report()
    finally:
        sink.close()
    sink.close()  # safe twice
    sink.send(bytes([0x90, 62, 100]))  # ignored once closed
    assert rep["callbacks"] > 0 and rep["block_size"] == 128
    # A JACK server in sync mode (as the tests run it) reports no extra output-port latency, so
    # the configured figure may be 0; the measured one always includes the block.
    assert rep["configured_latency_ms"] >= 0 and rep["measured_latency_ms_p50"] > 0
    assert rep["dropped"] == 0 and rep["timing"] == "exact"
    assert rep["scheduled_latency_ms"] >= rep["block_ms"]  # sent -> heard is at least one block, constant


@pytest.mark.jack
@pytest.mark.fluidsynth
def test_serve_with_audio_plays_what_goes_to_the_port_and_reports_latency(jack_server, tmp_path):
    # A separate process, as in use: in one process a new JACK client (the test's player) would
    # wait on the audio client's cycle while holding the GIL its Python callback needs.
    import json
    import signal

    from .conftest import served_process, sounding

    metrics = tmp_path / "metrics.json"
    with served_process("--audio", "--metrics-json", str(metrics)) as (proc, player, listener):
        player.send((0x90, 60, 64), (0x90, 64, 64))
        time.sleep(0.2)
        player.send((0x80, 60, 0), (0x80, 64, 0))
        assert listener.wait_for(lambda ms: len(ms) >= 4)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        code, err = proc.wait(20), proc.stderr.read()
        assert code == 0, err
    assert sounding(listener.messages()) == {}
    audio = json.loads(metrics.read_text())["audio"]
    # the four notes (and the shutdown's All Notes Off) reached the synth
    assert audio["played"] >= 4 and audio["callbacks"] > 0 and audio["measured_latency_ms_p50"] > 0
    assert "cadenza: audio:" in err and "measured p50" in err


def test_demo_excerpt_is_shipped_and_attributed():
    assets = importlib.resources.files("cadenza") / "assets"
    with importlib.resources.as_file(assets / "demo_excerpt.mid") as path:
        perf = MidiFile.load(path).performance
        length = mido.MidiFile(path).length
    assert 30 <= length <= 60 and perf.end <= length + 1e-6
    assert len(perf) > 50 and (perf.offset > perf.onset).all()
    assert not perf.pedal_at(np.array([length]))[0]  # the pedal is lifted at the cut
    text = (assets / "ATTRIBUTION.md").read_text()
    assert "CC BY-NC-SA 4.0" in text and "MAESTRO" in text and "Chopin" in text
