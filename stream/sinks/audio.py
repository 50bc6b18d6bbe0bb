"""Audio sinks: what the engine sends is heard (sounddevice) or recorded and rendered (WAV).

Both follow the engine's sink protocol — ``name``, ``send(data)`` for one complete MIDI message to
sound now, ``close()`` safe twice — so ``serve --audio`` and the demo need no special case.

PortAudio enumerates devices once, when it is initialised; a JACK server started later (our tests,
a user starting JACK after Cadenza) is invisible until PortAudio is initialised again. It also
keeps a JACK client open for as long as it is initialised, and aborts the process at exit if that
server has gone in the meantime. So the sink initialises PortAudio when it opens and terminates it
when it closes.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cadenza.config.settings import AudioSettings
from cadenza.errors import AudioError
from cadenza.stream.audio import PANIC, Synth, render_events

log = logging.getLogger(__name__)


def _sd():
    try:
        import sounddevice
    except OSError as exc:  # raised when libportaudio is missing
        raise AudioError(f"PortAudio is not available ({exc}); install it (Debian/Ubuntu: apt-get install libportaudio2)") from None
    return sounddevice


def refresh_portaudio():
    """(Re)initialise PortAudio so that it sees the devices and JACK servers present now."""
    sd = _sd()
    while sd._initialized:
        sd._terminate()
    sd._initialize()
    return sd


def release_portaudio() -> None:
    """Terminate PortAudio, closing its JACK client (see the module note)."""
    sd = _sd()
    while sd._initialized:
        sd._terminate()


def _jack_api(sd) -> dict | None:
    for api in sd.query_hostapis():
        if "JACK" in api["name"] and api["default_output_device"] >= 0:
            return api
    return None


def select_output_device(device: str | int | None = None) -> int:
    """The PortAudio output device index for ``audio.device``.

    ``None``/``"auto"``: a running JACK server if there is one (it is what a musician who runs JACK
    listens to, and it works on machines without a sound card), else the system default.
    ``"jack"``: JACK or an error. A number: that device index. Anything else: a name (substring).
    """
    sd = refresh_portaudio()
    devices = sd.query_devices()
    outputs = [d["index"] for d in devices if d["max_output_channels"] >= 2]
    if not outputs:
        release_portaudio()
        raise AudioError(
            "no audio output device found (no sound card, no JACK server); start JACK (jackd -d dummy works without hardware) or set audio.device"
        )
    names = ", ".join(f"{i}: {devices[i]['name']!r}" for i in outputs)
    jack = _jack_api(sd)
    spec = None if device is None else str(device).strip()
    if spec is None or spec.lower() == "auto":
        if jack is not None:
            return jack["default_output_device"]
        default = sd.default.device[1]
        return default if default in outputs else outputs[0]
    if spec.lower() == "jack":
        if jack is None:
            raise AudioError("audio device 'jack' requested but no JACK server is running")
        return jack["default_output_device"]
    if spec.isdigit():
        if int(spec) not in outputs:
            raise AudioError(f"audio device {spec} is not an output; available: {names}")
        return int(spec)
    try:
        return sd.query_devices(spec, "output")["index"]
    except ValueError:
        raise AudioError(f"audio device {spec!r} not found; available: {names}") from None


class AudioSink:
    """Plays what it is sent through FluidSynth on an audio device, with a small block size.

    ``send`` only stamps the message and appends it to a queue; the audio callback applies it.
    ``timing="exact"`` (default) places each message at its own sample: it is heard a constant
    ``scheduled_latency`` after it was sent (one block plus the device's output delay, plus a
    quarter block of slack), so block boundaries add no jitter. ``timing="asap"`` applies messages
    at the start of the next block: lower latency, up to one block of jitter. Exact timing needs the
    host API's timing information; where it reports none, the sink falls back to asap.
    Drop policy: the queue holds ``queue_size`` messages; when it is full (the audio thread has
    stalled) new note-ons are dropped and counted, everything else — note-offs, pedal — is kept.
    """

    def __init__(self, audio: AudioSettings | None = None, *, name: str = "audio", timing: str = "exact", queue_size: int = 4096) -> None:
        if timing not in ("exact", "asap"):
            raise ValueError(f"timing must be 'exact' or 'asap', not {timing!r}")
        audio = audio or AudioSettings()
        self.name = name
        self.timing = timing
        self._queue_size = queue_size
        self._pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self._delay: float | None = None  # exact timing: send -> heard, fixed at the first callback
        self.dropped = 0
        self.late = 0
        self._closed = False
        self._callbacks = 0
        self._underflows = 0
        self._played = 0  # messages the synth has taken (in the audio callback)
        self._dac_delay = np.zeros(2048)  # ring of per-callback output delays, seconds
        sd = _sd()
        index = select_output_device(audio.device)
        info = sd.query_devices(index)
        self.device = info["name"]
        self.host_api = sd.query_hostapis(info["hostapi"])["name"]
        # JACK runs every client at the server's rate; elsewhere PortAudio converts if needed.
        self.sample_rate = int(info["default_samplerate"]) if "JACK" in self.host_api else audio.sample_rate
        self.block_size = audio.block_size
        self.synth = Synth(soundfont=audio.soundfont, sample_rate=self.sample_rate, gain=audio.gain)
        try:
            self._stream = sd.OutputStream(
                device=index,
                samplerate=self.sample_rate,
                blocksize=self.block_size,
                channels=2,
                dtype="float32",
                latency="low",
                callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            self.synth.close()
            release_portaudio()
            raise AudioError(f"cannot open audio device {self.device!r} ({self.host_api}): {exc}") from None

    def _callback(self, out, frames, t, status) -> None:  # PortAudio's thread
        now = time.perf_counter()
        if status.output_underflow:
            self._underflows += 1
        gap = t.outputBufferDacTime - t.currentTime  # this block is heard that long from now
        self._dac_delay[self._callbacks % len(self._dac_delay)] = gap
        self._callbacks += 1
        exact = self.timing == "exact" and gap > 0 and t.currentTime > 0
        if exact and self._delay is None:
            # A message sent just after this callback started waits one block for the next one.
            self._delay = (1.25 * frames) / self.sample_rate + gap
        # When out[0] will be heard, on the clock send() stamps with. Measured afresh every block
        # rather than extrapolated from a frame count: a device clock that drifts (JACK's dummy
        # driver on a busy machine runs slower than real time) then cannot make latency grow.
        heard = now + gap
        pending, handle, render, rate = self._pending, self.synth.handle, self.synth.render_into, self.sample_rate
        pos = 0
        while pending:
            sent, msg = pending[0]
            if exact:
                offset = round((sent + self._delay - heard) * rate)
                if offset >= frames:
                    break  # due in a later block
                if offset < 0:  # the callback itself ran late
                    self.late += 1
                    offset = 0
                if offset > pos:
                    render(out[pos:offset])
                    pos = offset
            pending.popleft()
            handle(msg)
            self._played += 1
        if pos < frames:
            render(out[pos:])

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        if len(self._pending) >= self._queue_size and data[0] & 0xF0 == 0x90 and len(data) > 2 and data[2] > 0:
            self.dropped += 1
            return
        self._pending.append((time.perf_counter(), bytes(data)))

    def latency_report(self) -> dict:
        """Configured and measured output latency, in milliseconds."""
        n = min(self._callbacks, len(self._dac_delay))
        delays = self._dac_delay[:n]
        delays = delays[delays > 0] * 1e3  # host APIs without timing report 0
        return {
            "device": self.device,
            "host_api": self.host_api,
            "sample_rate": self.sample_rate,
            "block_size": self.block_size,
            "block_ms": 1e3 * self.block_size / self.sample_rate,
            "configured_latency_ms": 1e3 * float(self._stream.latency),
            "measured_latency_ms_p50": float(np.median(delays)) if len(delays) else None,
            "measured_latency_ms_max": float(delays.max()) if len(delays) else None,
            "timing": self.timing if self._delay is not None or self.timing == "asap" else "asap (no stream clock)",
            "scheduled_latency_ms": 1e3 * self._delay if self._delay is not None else None,
            "callbacks": self._callbacks,
            "played": self._played,
            "underflows": self._underflows,
            "late": self.late,
            "dropped": self.dropped,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.perf_counter()
        self._pending.extend((now, msg) for msg in PANIC)
        # Let the callback play the releases so the sound stops without a click, a few blocks at most.
        deadline = time.monotonic() + 8 * self.block_size / self.sample_rate + (self._delay or 0) + 0.05
        while self._pending and self._stream.active and time.monotonic() < deadline:
            time.sleep(self.block_size / self.sample_rate)
        try:
            self._stream.stop()
            self._stream.close()
        except Exception as exc:  # the device vanished: nothing left to stop
            log.warning("audio device %r did not close cleanly: %s", self.device, exc)
        self._pending.clear()
        self.synth.all_notes_off()
        self.synth.close()
        release_portaudio()

    def __enter__(self) -> AudioSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WavSink:
    """Records what it is sent with its time of arrival and renders a WAV of it on ``close``.

    ``clock`` gives seconds; pass the engine's clock when it runs faster than real time. Time 0
    is the first message, so start-up time is not heard as silence. The file appears atomically.
    ``normalize`` scales it to a -1 dBFS peak (a quiet excerpt at the default gain peaks near -25 dBFS).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        audio: AudioSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "wav",
        tail_s: float = 1.0,
        normalize: bool = False,
    ) -> None:
        self.name = name
        self.path = Path(path)
        self._audio = audio or AudioSettings()
        self._clock = clock
        self._tail_s = tail_s
        self._normalize = normalize
        self._t0: float | None = None
        self.events: list[tuple[float, bytes]] = []
        self.report: dict | None = None
        self._closed = False

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        self.events.append((now - self._t0, bytes(data)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        a = self._audio
        self.report = render_events(
            self.events,
            self.path,
            soundfont=a.soundfont,
            sample_rate=a.sample_rate,
            gain=a.gain,
            tail_s=self._tail_s,
            normalize=self._normalize,
        )

    def __enter__(self) -> WavSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
