"""Sound: a FluidSynth General MIDI synth, a live audio sink, a WAV sink and offline rendering.

The synth is fed raw MIDI bytes, the same messages every other sink receives, so the engine does
not know whether it talks to a MIDI port or to a loudspeaker. Live output pulls audio from the synth
in a PortAudio callback (sounddevice); offline rendering renders the exact number of frames between
events, which makes it sample-accurate and much faster than real time.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import io
import logging
import os
import tempfile
import time
import wave
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cadenza.atomic import atomic_path
from cadenza.errors import AudioError, MidiFileError
from cadenza.messages import control
from cadenza.stream.loudness import LoudnessMeter

log = logging.getLogger(__name__)

# Where OS packages put a General MIDI SoundFont, the piano that shows the dynamics first: MuseScore
# General's piano is sampled at several velocities, so a harder strike is brighter as well as
# louder, where TimGM6mb and FluidR3 only get louder (`cadenza bench piano`, docs/benchmarks.md).
# The Lite build has the same piano as the Full one and loads faster. TimGM6mb (6 MB,
# loads in milliseconds) is the fallback. Reading .sf3 needs a FluidSynth built with libsndfile
# (Debian's, Homebrew's).
SOUNDFONT_CANDIDATES: tuple[str, ...] = (
    "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3",  # Debian/Ubuntu: musescore-general-soundfont-small
    "/usr/share/sounds/sf3/MuseScore_General_Full.sf3",  # Debian/Ubuntu: musescore-general-soundfont
    "/usr/share/sounds/sf3/MuseScore_General.sf3",  # Debian alternatives link to one of the two
    "/usr/share/sounds/sf2/TimGM6mb.sf2",  # Debian/Ubuntu: timgm6mb-soundfont
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian/Ubuntu: fluid-soundfont-gm
    "/usr/share/sounds/sf2/default-GM.sf2",  # Debian alternatives link
    "/usr/share/soundfonts/default.sf2",  # Fedora, Arch
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/*.sf2",
    "/opt/homebrew/share/fluid-synth/sf2/*.sf2",  # Homebrew (Apple silicon)
    "/usr/local/share/fluid-synth/sf2/*.sf2",  # Homebrew (Intel)
    "/opt/homebrew/share/soundfonts/*.sf2",
    "/usr/local/share/soundfonts/*.sf2",
    "~/Library/Audio/Sounds/Banks/*.sf2",  # macOS: where users keep SoundFonts
)

INSTALL_HINT = "install one (Debian/Ubuntu: apt-get install musescore-general-soundfont-small for a piano that shows the dynamics, or apt-get install timgm6mb-soundfont, 6 MB; macOS: brew install fluid-synth and put a GM .sf2 in /opt/homebrew/share/soundfonts) or set audio.soundfont"


def find_soundfont(configured: Path | str | None = None, *, candidates: Sequence[str] = SOUNDFONT_CANDIDATES) -> Path:
    """The configured SoundFont, or the first one an OS package installed."""
    if configured is not None:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise AudioError(f"SoundFont {str(path)!r} not found")
        return path
    for cand in candidates:
        cand = os.path.expanduser(cand)
        for hit in sorted(glob.glob(cand)) if any(c in cand for c in "*?[") else [cand]:
            if Path(hit).is_file():
                return Path(hit)
    raise AudioError(f"no General MIDI SoundFont found; {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------
# FluidSynth


def _fluidsynth():
    try:
        # pyfluidsynth prints where it found the library when $CI is set; that line would land
        # in our own stdout (the demo summary, `render` output), so it goes to the debug log.
        with contextlib.redirect_stdout(io.StringIO()) as said:
            import fluidsynth
        if said.getvalue().strip():
            log.debug("pyfluidsynth: %s", said.getvalue().strip())
    except ImportError as exc:  # pyfluidsynth raises ImportError when libfluidsynth is missing
        raise AudioError(f"FluidSynth is not available ({exc}); install it (Debian/Ubuntu: apt-get install libfluidsynth3)") from None
    return fluidsynth


_LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_log_callback = None  # kept alive for as long as FluidSynth may call it
_raw: dict[str, Callable] = {}


def _bind(fs) -> dict[str, Callable]:
    """The C functions used per event and per block, bound once (pyfluidsynth lacks some)."""
    global _log_callback
    if _raw:
        return _raw
    c, vp, i = fs.cfunc, ctypes.c_void_p, ctypes.c_int
    _raw.update(
        noteon=c("fluid_synth_noteon", i, ("synth", vp, 1), ("chan", i, 1), ("key", i, 1), ("vel", i, 1)),
        noteoff=c("fluid_synth_noteoff", i, ("synth", vp, 1), ("chan", i, 1), ("key", i, 1)),
        key_pressure=c("fluid_synth_key_pressure", i, ("synth", vp, 1), ("chan", i, 1), ("key", i, 1), ("val", i, 1)),
        cc=c("fluid_synth_cc", i, ("synth", vp, 1), ("chan", i, 1), ("num", i, 1), ("val", i, 1)),
        program_change=c("fluid_synth_program_change", i, ("synth", vp, 1), ("chan", i, 1), ("prog", i, 1)),
        channel_pressure=c("fluid_synth_channel_pressure", i, ("synth", vp, 1), ("chan", i, 1), ("val", i, 1)),
        pitch_bend=c("fluid_synth_pitch_bend", i, ("synth", vp, 1), ("chan", i, 1), ("val", i, 1)),
        write_float=c(
            "fluid_synth_write_float",
            i,
            ("synth", vp, 1),
            ("len", i, 1),
            ("lout", vp, 1),
            ("loff", i, 1),
            ("lincr", i, 1),
            ("rout", vp, 1),
            ("roff", i, 1),
            ("rincr", i, 1),
        ),
    )
    # FluidSynth prints warnings and errors to stderr; Cadenza reports problems itself, so its
    # messages go to the debug log instead of cluttering a musician's terminal.
    set_log = c("fluid_set_log_function", vp, ("level", i, 1), ("fun", _LOG_FN, 1), ("data", vp, 1))
    if set_log is not None:
        _log_callback = _LOG_FN(lambda level, msg, data: log.debug("fluidsynth[%d]: %s", level, (msg or b"").decode(errors="replace")))
        for level in range(5):
            set_log(level, _log_callback, None)
    return _raw


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C libraries writing to fd 2 (libinstpatch's GLib warnings on a damaged SoundFont).

    Cadenza reports the problem itself, as one line. The same trick sounddevice uses at import.
    """
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Channel message kind -> FluidSynth call (c: the bound C functions, p: the synth).
_KINDS: dict[int, Callable] = {
    0x80: lambda c, p, ch, d1, d2: c["noteoff"](p, ch, d1),
    0x90: lambda c, p, ch, d1, d2: c["noteon"](p, ch, d1, d2),  # velocity 0 releases, in FluidSynth too
    0xA0: lambda c, p, ch, d1, d2: c["key_pressure"](p, ch, d1, d2),
    0xB0: lambda c, p, ch, d1, d2: c["cc"](p, ch, d1, d2),
    0xC0: lambda c, p, ch, d1, d2: c["program_change"](p, ch, d1),
    0xD0: lambda c, p, ch, d1, d2: c["channel_pressure"](p, ch, d1),
    0xE0: lambda c, p, ch, d1, d2: c["pitch_bend"](p, ch, d1 | (d2 << 7)),  # 14 bits, 8192 = centre
}


class Synth:
    """A FluidSynth instance playing raw MIDI channel messages with a General MIDI SoundFont.

    FluidSynth's API is thread-safe, but :class:`AudioSink` still hands events to the audio
    thread through a queue so that the event loop never waits on the synth's lock.
    """

    def __init__(self, *, soundfont: Path | str | None = None, sample_rate: int = 48000, gain: float = 0.5) -> None:
        fs = _fluidsynth()
        self._c = _bind(fs)
        self.sample_rate = int(sample_rate)
        self.soundfont = find_soundfont(soundfont)
        self._fs = fs.Synth(gain=float(gain), samplerate=float(self.sample_rate))
        self._ptr = self._fs.synth
        # Resetting presets on load gives every channel its General MIDI default, drums on 10.
        with _quiet_stderr():
            self.sfid = self._fs.sfload(str(self.soundfont), 1)
        if self.sfid < 0:
            self._fs.delete()
            raise AudioError(f"{self.soundfont}: not a usable SoundFont")
        for chan in range(16):
            if chan != 9:
                self._fs.program_select(chan, self.sfid, 0, 0)
        self._deleted = False

    def handle(self, msg: bytes) -> bool:
        """Play one raw channel message; False for messages a synth ignores (clock, SysEx, …)."""
        if not msg or msg[0] < 0x80 or msg[0] >= 0xF0:
            return False
        kind, chan = msg[0] & 0xF0, msg[0] & 0x0F
        d1 = msg[1] if len(msg) > 1 else 0
        d2 = msg[2] if len(msg) > 2 else 0
        _KINDS[kind](self._c, self._ptr, chan, d1, d2)
        return True

    def render_into(self, out: np.ndarray) -> None:
        """Fill a C-contiguous (n, 2) float32 array in place (no allocation: the audio callback uses it)."""
        addr = out.ctypes.data
        self._c["write_float"](self._ptr, out.shape[0], addr, 0, 2, addr, 1, 2)

    def render(self, n_frames: int) -> np.ndarray:
        out = np.empty((int(n_frames), 2), np.float32)
        if n_frames > 0:
            self.render_into(out)
        return out

    def all_notes_off(self) -> None:
        """Sustain off, then every note released (CC 64 = 0, CC 123) on all channels."""
        for chan in range(16):
            self._c["cc"](self._ptr, chan, 64, 0)
            self._c["cc"](self._ptr, chan, 123, 0)

    def active_voices(self) -> int:
        return self._fs.get_active_voice_count()

    def close(self) -> None:
        if not self._deleted:
            self._deleted = True
            self._fs.delete()


PANIC: tuple[bytes, ...] = tuple(control(ch, cc, 0) for ch in range(16) for cc in (64, 123))


# --------------------------------------------------------------------------------------------
# Offline rendering

# normalize=True: the loudest sample at -1 dBFS, below the 16-bit ceiling with a decibel to spare
# for the overshoot between samples when the file is played or resampled. For a piano this is also
# a sensible loudness: its peak-to-loudness ratio is around 15 dB (`cadenza bench piano` and the
# demo's loudness in docs/benchmarks.md), so a -1 dBFS peak lands near the -16 LUFS streaming
# services aim at, while a louder loudness target would clip, or need a limiter that flattens
# exactly the hammer attacks the velocities shape. ``loudness=`` aims at an integrated loudness
# instead (to compare two renderings fairly), never above the same peak ceiling.
NORMALIZE_PEAK = 10 ** (-1 / 20)


class _Level:
    """Peak, RMS and integrated loudness of the blocks that pass through (float, full scale 1)."""

    def __init__(self, sample_rate: int) -> None:
        self.frames = 0
        self.peak = 0.0
        self._sq = 0.0
        self._meter = LoudnessMeter(sample_rate)

    def add(self, block: np.ndarray) -> None:
        self.frames += len(block)
        self.peak = max(self.peak, float(np.abs(block).max()))
        self._sq += float(np.square(block, dtype=np.float64).sum())
        self._meter.add(block)

    @property
    def rms(self) -> float:
        return (self._sq / max(1, 2 * self.frames)) ** 0.5

    def lufs(self, gain_db: float = 0.0) -> float:
        """Integrated loudness after ``gain_db`` (LUFS)."""
        return self._meter.after_gain(gain_db)

    def gain_to(self, lufs: float) -> float:
        return self._meter.gain_to(lufs)


class _WavWriter:
    """Float blocks in, 16-bit stereo PCM out, scaled by ``scale``."""

    def __init__(self, path: Path, sample_rate: int, scale: float = 1.0) -> None:
        self._w = wave.open(str(path), "wb")
        self._w.setnchannels(2)
        self._w.setsampwidth(2)
        self._w.setframerate(sample_rate)
        self.scale = scale

    def write(self, block: np.ndarray) -> None:
        if len(block) == 0:
            return
        if self.scale != 1.0:
            block = block * self.scale
        pcm = np.clip(np.rint(block * 32767.0), -32768, 32767).astype("<i2")
        self._w.writeframes(pcm.tobytes())

    def close(self) -> None:
        self._w.close()


class _Measured:
    """Measures every block, then hands it to ``out`` (a :class:`_WavWriter` or a spool file)."""

    def __init__(self, level: _Level, out: Callable[[np.ndarray], object]) -> None:
        self.level, self._out = level, out

    def write(self, block: np.ndarray) -> None:
        if len(block):
            self.level.add(block)
            self._out(block)


def _play(events: Sequence[tuple[float, bytes]], end_s: float, synth: Synth, writer: _Measured, tail_s: float) -> int:
    """Render exactly the frames between events, so every event lands on its sample."""
    rate = synth.sample_rate
    block = np.empty((4096, 2), np.float32)
    cursor = handled = 0

    def advance_to(frame: int) -> None:
        nonlocal cursor
        while cursor < frame:
            n = min(frame - cursor, len(block))
            synth.render_into(block[:n])
            writer.write(block[:n])
            cursor += n

    for t, msg in events:
        advance_to(int(round(max(0.0, t) * rate)))
        handled += synth.handle(msg)
    advance_to(int(round(max(0.0, end_s) * rate)))
    for msg in PANIC:  # the tail lets released notes and reverb ring out
        synth.handle(msg)
    advance_to(cursor + int(round(tail_s * rate)))
    return handled


def _scale(level: _Level, loudness: float | None) -> float:
    """The gain that normalizes what ``level`` measured (see NORMALIZE_PEAK)."""
    if level.peak <= 0:  # silence stays silence
        return 1.0
    ceiling = NORMALIZE_PEAK / level.peak
    if loudness is None or not np.isfinite(level.lufs()):
        return ceiling
    return min(ceiling, 10 ** (level.gain_to(loudness) / 20))


def _render(
    events: Sequence[tuple[float, bytes]],
    end_s: float,
    out_wav,
    *,
    soundfont,
    sample_rate: int,
    gain: float,
    tail_s: float,
    normalize: bool,
    loudness: float | None = None,
) -> dict:
    t0 = time.perf_counter()
    level = _Level(sample_rate)
    synth = Synth(soundfont=soundfont, sample_rate=sample_rate, gain=gain)
    scale = 1.0
    try:
        with atomic_path(out_wav) as tmp:
            if not normalize:
                writer = _WavWriter(tmp, sample_rate)
                try:
                    handled = _play(events, end_s, synth, _Measured(level, writer.write), tail_s)
                finally:
                    writer.close()
            else:
                # The synth plays once, into an anonymous float spool; the gain is known only at
                # the end, then the spool is scaled into the WAV (memory stays one block).
                with tempfile.TemporaryFile() as spool:
                    handled = _play(events, end_s, synth, _Measured(level, lambda b: spool.write(b.tobytes())), tail_s)
                    scale = _scale(level, loudness)
                    spool.seek(0)
                    writer = _WavWriter(tmp, sample_rate, scale)
                    try:
                        while chunk := spool.read(4096 * 8):
                            writer.write(np.frombuffer(chunk, np.float32).reshape(-1, 2))
                    finally:
                        writer.close()
    except OSError as exc:  # unwritable folder, full disk: nothing is left under the final name
        raise AudioError(f"cannot write {out_wav}: {exc.strerror or exc}") from None
    finally:
        synth.close()
    elapsed = time.perf_counter() - t0
    duration = level.frames / sample_rate
    gain_db = 20 * float(np.log10(scale))
    return {
        "path": str(out_wav),
        "soundfont": str(synth.soundfont),
        "sample_rate": sample_rate,
        "frames": level.frames,
        "duration_s": duration,
        "events": handled,
        "peak": level.peak * scale,
        "rms": level.rms * scale,
        "loudness_lufs": level.lufs(gain_db),
        "gain_db": gain_db,
        "render_s": elapsed,
        "realtime_factor": duration / elapsed if elapsed > 0 else float("inf"),
    }


def render_events(
    events: Sequence[tuple[float, bytes]],
    out_wav,
    *,
    soundfont: Path | str | None = None,
    sample_rate: int = 44100,
    tail_s: float = 1.0,
    gain: float = 0.5,
    normalize: bool = False,
    loudness: float | None = None,
) -> dict:
    """Render (time in seconds, raw MIDI bytes) events to a 16-bit stereo WAV, atomically.

    soundfont: .sf2/.sf3 path, default :func:`find_soundfont`. gain: FluidSynth's master gain.
    tail_s: the audio lasts until the last event plus this; then every note is released and rings out.
    normalize: scale the result so its peak is -1 dBFS (quiet pieces become audible; see NORMALIZE_PEAK).
    loudness: with normalize, aim at this integrated loudness in LUFS instead, the peak staying at
    or below -1 dBFS (so the result may be quieter than asked).
    Returns duration, real-time factor, peak and RMS level (0..1 full scale), loudness (LUFS),
    the gain applied (dB), events played.
    """
    ordered = sorted(events, key=lambda e: e[0])  # stable: equal times keep their order
    end = ordered[-1][0] if ordered else 0.0
    return _render(
        ordered,
        end,
        out_wav,
        soundfont=soundfont,
        sample_rate=sample_rate,
        gain=gain,
        tail_s=tail_s,
        normalize=normalize,
        loudness=loudness,
    )


def midi_file_events(in_path) -> tuple[list[tuple[float, bytes]], float]:
    """All channel messages of a MIDI file as (seconds, bytes), tempo map applied, and its length."""
    import mido

    from cadenza.midifile import MidiFile

    MidiFile.load(in_path)  # strict structural check first: a one-line MidiFileError
    try:
        mid = mido.MidiFile(in_path)
        events, t = [], 0.0
        for msg in mid:  # merged tracks, delta times in seconds
            t += msg.time
            if not msg.is_meta and msg.type != "sysex":
                events.append((t, bytes(msg.bytes())))
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise MidiFileError(f"{in_path}: cannot read MIDI ({exc})".replace("\n", " ")) from None
    return events, t


def render_midi(
    in_path,
    out_wav,
    *,
    soundfont: Path | str | None = None,
    sample_rate: int = 44100,
    tail_s: float = 1.0,
    gain: float = 0.5,
    normalize: bool = False,
    loudness: float | None = None,
) -> dict:
    """Render a MIDI file (all channels, pedals, programs, tempo map) to WAV; see :func:`render_events`."""
    events, length = midi_file_events(in_path)
    return _render(
        events,
        length,
        out_wav,
        soundfont=soundfont,
        sample_rate=sample_rate,
        gain=gain,
        tail_s=tail_s,
        normalize=normalize,
        loudness=loudness,
    )


def __getattr__(name: str):
    # The sinks live in audio_sink.py (they need PortAudio); reachable from here without
    # importing sounddevice for offline rendering.
    if name in ("AudioSink", "WavSink"):
        from cadenza.stream.sinks import audio as audio_sink

        return getattr(audio_sink, name)
    raise AttributeError(name)
