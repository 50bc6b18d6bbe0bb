"""Sinks: where the engine's output goes.

A sink takes raw MIDI messages (bytes, status byte first) in the order the engine emits them.
The engine does not know which kind it talks to: its :class:`Sinks` sorts them once, by the
protocol each one declares (a routed sink first, since a transport may also offer ``send``), and
calls each the way its protocol says.

=====================  ==========================================================
``Sink``               the protocol: ``name``, ``send(data)``, ``close()``
``RoutedSink``         for transports serving many sources (sessions):
                       ``send_from(source, data)`` instead of ``send``
``TaggedSink``         for recorders: ``send_tagged(t, data, tag)`` with the music
                       time and where the message came from
``ListSink``           keeps every message (tests, files)
``CountingSink``       counts messages (benches)
``record.Recorder``    keeps (music time, message, tag) (the demo's files)
``audio.AudioSink``    FluidSynth into the sound card (PortAudio)
``audio.WavSink``      FluidSynth into a WAV file
MIDI port              :class:`cadenza.stream.ports.MidiOutputPort`
MQTT                   :class:`cadenza.stream.mqtt.daemon.MqttTransport` (routed)
=====================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    """Where output goes; ``close()`` is safe to call twice."""

    name: str

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RoutedSink(Protocol):
    """A sink serving several sources: each message goes back to the source it came from."""

    name: str

    def send_from(self, source: int, data: bytes) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class TaggedSink(Protocol):
    """A sink that also wants each message's music time and origin ``tag``: None for the
    performer's own notes, an int for a phrase response (its id), or "panic", "release",
    "state" for what the engine and its stages add."""

    name: str

    def send_tagged(self, t: float, data: bytes, tag: object) -> None: ...

    def close(self) -> None: ...


AnySink = Sink | RoutedSink | TaggedSink


class Sinks:
    """The engine's sinks, sorted once by declared protocol (no per-message type test)."""

    def __init__(self, sinks: Iterable[AnySink] = ()) -> None:
        self.all: list[AnySink] = []
        self._plain: list[Sink] = []
        self._routed: list[RoutedSink] = []
        self._tagged: list[TaggedSink] = []
        for sink in sinks:
            self.add(sink)

    def add(self, sink: AnySink) -> None:
        if isinstance(sink, RoutedSink):
            self._routed.append(sink)
        elif isinstance(sink, TaggedSink):
            self._tagged.append(sink)
        elif isinstance(sink, Sink):
            self._plain.append(sink)
        else:
            raise TypeError(f"{sink!r} is not a sink (send, send_from or send_tagged, and close)")
        self.all.append(sink)

    def send(self, source: int, data: bytes, t: float, tag: object) -> None:
        """One message from ``source`` (for routed sinks) at music time ``t`` with ``tag`` (for tagged ones)."""
        for sink in self._plain:
            sink.send(data)
        for routed in self._routed:
            routed.send_from(source, data)
        for tagged in self._tagged:
            tagged.send_tagged(t, data, tag)

    def __iter__(self) -> Iterator[AnySink]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)


class ListSink:
    """Keeps every message sent to it, in order."""

    name = "list"

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.messages.append(data)

    def close(self) -> None:
        self.closed = True


class CountingSink:
    """Counts what is sent to it and keeps nothing (for benches at thousands of notes/s)."""

    name = "count"

    def __init__(self) -> None:
        self.n = 0

    def send(self, data: bytes) -> None:
        self.n += 1

    def close(self) -> None:
        pass
