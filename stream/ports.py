"""MIDI ports through python-rtmidi: backend choice, virtual or attached ports, presence checks.

Input does nothing but stamp each message with ``time.monotonic()`` (the asyncio loop's clock)
and hand it over; all work happens on the loop.

Why a polling thread and not rtmidi's callback: python-rtmidi runs the callback in the backend's
own thread — for JACK, the real-time process thread — and the callback must take the GIL. While
it waits for the GIL, JACK can move to the next cycle and reuse the port buffer, and the callback
then reads another event's bytes: under load, chords arrive with duplicated or shifted notes. With no callback, rtmidi copies each event into its own lock-free
queue inside the process cycle (no Python involved), and :class:`InputPoller` drains that queue
from an ordinary thread every ``POLL_S``, which costs at most that much latency.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable

import rtmidi

from cadenza.errors import PortError
from cadenza.harness.jack import jack_running

log = logging.getLogger(__name__)

_API = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "winmm": rtmidi.API_WINDOWS_MM,
}
_NAMES = {v: k for k, v in _API.items()}
JACK_HINT = "start one with `jackd --no-realtime --sync -d dummy -r 48000 -p 64 &` (Debian/Ubuntu: apt-get install jackd2)"


def alsa_available() -> bool:
    return rtmidi.API_LINUX_ALSA in rtmidi.get_compiled_api() and os.path.exists("/dev/snd/seq")


def resolve_api(name: str) -> int:
    """The rtmidi API constant for a ``--midi-api`` value; PortError with a way out if unusable."""
    compiled = set(rtmidi.get_compiled_api())
    if name == "auto":
        if sys.platform == "darwin" and rtmidi.API_MACOSX_CORE in compiled:
            return rtmidi.API_MACOSX_CORE
        if sys.platform == "win32" and rtmidi.API_WINDOWS_MM in compiled:
            return rtmidi.API_WINDOWS_MM
        if alsa_available():
            return rtmidi.API_LINUX_ALSA
        if rtmidi.API_UNIX_JACK in compiled and jack_running():
            return rtmidi.API_UNIX_JACK
        raise PortError(f"no MIDI backend: no ALSA sequencer (/dev/snd/seq) and no JACK server running; {JACK_HINT}")
    api = _API[name]
    if api not in compiled:
        raise PortError(f"this python-rtmidi build has no {name} support (compiled: {', '.join(_NAMES.get(a, str(a)) for a in compiled)})")
    if name == "alsa" and not os.path.exists("/dev/snd/seq"):
        raise PortError("ALSA sequencer not available (/dev/snd/seq missing: load snd-seq or use --midi-api jack)")
    if name == "jack" and not jack_running():
        raise PortError(f"no JACK server running; {JACK_HINT}")
    return api


def api_name(api: int) -> str:
    return _NAMES.get(api, str(api))


POLL_S = 0.0002


def make_drain(midi: rtmidi.MidiIn, deliver: Callable[[float, bytes], None]) -> Callable[[], bool]:
    """A function that hands everything queued on ``midi`` to ``deliver(time, bytes)`` and says
    whether there was anything: the poller thread's body, and a busy-polling loop's poller."""
    get = midi.get_message

    def drain() -> bool:
        msg = get()
        if msg is None:
            return False
        while msg is not None:
            deliver(time.monotonic(), bytes(msg[0]))
            msg = get()
        return True

    return drain


class InputPoller:
    """A thread that drains an rtmidi input queue and hands ``(time, bytes)`` to ``deliver``."""

    def __init__(self, midi: rtmidi.MidiIn, deliver: Callable[[float, bytes], None], *, name: str = "midi-in") -> None:
        self._midi = midi
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        drain = make_drain(self._midi, self._deliver)
        while not self._stop.is_set():
            if not drain():
                time.sleep(POLL_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(1.0)


def _quiet_errors(obj) -> None:
    # rtmidi prints backend warnings to stderr by default; route them to our log instead.
    obj.set_error_callback(lambda etype, msg, data=None: log.warning("rtmidi: %s", msg))


def find_port(ports: list[str], spec: str) -> int | None:
    """Index of the port matching ``spec``: exact name, ``client:port`` suffix, or ``/regex/``."""
    if len(spec) > 2 and spec.startswith("/") and spec.endswith("/"):
        rx = re.compile(spec[1:-1])
        for i, p in enumerate(ports):
            if rx.search(p):
                return i
        return None
    for i, p in enumerate(ports):
        if p == spec:
            return i
    for i, p in enumerate(ports):
        # JACK names are "client:port", ALSA's "client:port cc:pp"; accept the bare port name.
        if p.split(":", 1)[-1] == spec or re.sub(r" \d+:\d+$", "", p) == spec:
            return i
    return None


def list_ports(api: int) -> tuple[list[str], list[str]]:
    """(inputs we can read from, outputs we can write to) for one backend."""
    mi = rtmidi.MidiIn(api, "cadenza-probe")
    mo = rtmidi.MidiOut(api, "cadenza-probe")
    try:
        return mi.get_ports(), mo.get_ports()
    finally:
        mi.delete()
        mo.delete()


class _Port:
    """What inputs and outputs share: open virtual or attach by name, notice loss, reattach.

    Subclasses say which rtmidi class they use (``_rtmidi``, ``_kind``) and what to do once the
    port is open (``_opened``) and before it closes (``_closing``). ``close()`` is safe twice.
    """

    _kind = "port"

    def __init__(self, api: int, *, client_name: str, name: str, attach: bool) -> None:
        self.api = api
        self.spec = name
        self.attach = attach
        self._client_name = client_name
        self._midi = None
        self.name = name
        self.connected = False
        self._open()

    def _rtmidi(self):
        raise NotImplementedError

    def _opened(self, midi) -> None:
        pass

    def _closing(self) -> None:
        pass

    def _open(self) -> None:
        midi = self._rtmidi()
        _quiet_errors(midi)
        if self.attach:
            ports = midi.get_ports()
            idx = find_port(ports, self.spec)
            if idx is None:
                midi.delete()
                raise PortError(f"{self._kind} port {self.spec!r} not found; available: {', '.join(ports) or 'none'}")
            midi.open_port(idx)
            self.name = ports[idx]
        else:
            midi.open_virtual_port(self.spec)
        self._midi = midi
        self._opened(midi)
        self.connected = True

    def present(self) -> bool:
        """For attached ports: whether the port at the other end still exists."""
        if not self.attach or self._midi is None:
            return True
        return self.name in self._midi.get_ports()

    def reopen(self) -> bool:
        """Try to attach again; True on success."""
        self.close()
        try:
            self._open()
            return True
        except PortError:
            return False

    def close(self) -> None:
        self._closing()
        midi, self._midi = self._midi, None
        self.connected = False
        if midi is not None:
            midi.close_port()
            midi.delete()


class MidiInputPort(_Port):
    """An rtmidi input; every message goes to ``deliver(time, bytes)``.

    By default from the poller thread. With ``poll_on`` (a :class:`~cadenza.stream.spin.SpinEventLoop`)
    there is no thread: the busy-polling loop drains the queue itself between its other work, and
    ``deliver`` is called on the loop thread.
    """

    _kind = "input"

    def __init__(
        self, api: int, *, client_name: str, name: str, attach: bool, deliver: Callable[[float, bytes], None], poll_on=None
    ) -> None:
        self._deliver = deliver
        self._poll_on = poll_on
        self._poller: InputPoller | Callable[[], bool] | None = None
        super().__init__(api, client_name=client_name, name=name, attach=attach)

    def _rtmidi(self):
        midi = rtmidi.MidiIn(self.api, self._client_name, queue_size_limit=16384)
        midi.ignore_types(sysex=False, timing=False, active_sense=True)
        return midi

    def _opened(self, midi) -> None:
        if self._poll_on is None:
            self._poller = InputPoller(midi, self._deliver)
            return
        self._poller = make_drain(midi, self._deliver)
        self._poll_on.add_poller(self._poller)

    def _closing(self) -> None:
        poller, self._poller = self._poller, None
        if isinstance(poller, InputPoller):
            poller.stop()
        elif poller is not None:
            self._poll_on.remove_poller(poller)


class MidiOutputPort(_Port):
    """An rtmidi output; implements the engine's sink protocol."""

    _kind = "output"

    def __init__(self, api: int, *, client_name: str, name: str, attach: bool) -> None:
        self.errors = 0
        super().__init__(api, client_name=client_name, name=name, attach=attach)

    def _rtmidi(self):
        return rtmidi.MidiOut(self.api, self._client_name)

    def send(self, data: bytes) -> None:
        midi = self._midi
        if midi is None:
            self.errors += 1
            return
        try:
            midi.send_message(data)
        except (rtmidi.RtMidiError, ValueError):
            self.errors += 1
