"""Raw MIDI message kinds, as a table rather than an if-chain (after mido's specs).

The engine works on raw ``bytes`` end to end: one complete message per item, as python-rtmidi
delivers it. ``classify`` validates a message and names its kind; anything malformed is reported
as ``None`` so the caller can drop and count it.
"""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    NOTE_OFF = 0
    NOTE_ON = 1
    POLY_AFTERTOUCH = 2
    CONTROL = 3
    PROGRAM = 4
    CHANNEL_AFTERTOUCH = 5
    PITCH_BEND = 6
    SYSEX = 7
    COMMON = 8  # MTC quarter frame, song position, song select, tune request
    CLOCK = 9  # 0xF8 timing clock
    TRANSPORT = 10  # start, continue, stop
    REALTIME = 11  # active sensing, reset, undefined real-time


# status (high nibble for channel messages) -> (kind, total length)
_CHANNEL = {
    0x80: (Kind.NOTE_OFF, 3),
    0x90: (Kind.NOTE_ON, 3),
    0xA0: (Kind.POLY_AFTERTOUCH, 3),
    0xB0: (Kind.CONTROL, 3),
    0xC0: (Kind.PROGRAM, 2),
    0xD0: (Kind.CHANNEL_AFTERTOUCH, 2),
    0xE0: (Kind.PITCH_BEND, 3),
}
_SYSTEM = {
    0xF1: (Kind.COMMON, 2),
    0xF2: (Kind.COMMON, 3),
    0xF3: (Kind.COMMON, 2),
    0xF6: (Kind.COMMON, 1),
    0xF8: (Kind.CLOCK, 1),
    0xFA: (Kind.TRANSPORT, 1),
    0xFB: (Kind.TRANSPORT, 1),
    0xFC: (Kind.TRANSPORT, 1),
    0xFE: (Kind.REALTIME, 1),
    0xFF: (Kind.REALTIME, 1),
}

# Messages the engine must never drop when a queue is full: dropping them hangs notes or
# breaks the pedal/clock state downstream.
NEVER_DROP = frozenset({Kind.NOTE_OFF, Kind.CONTROL, Kind.CLOCK, Kind.TRANSPORT})


def classify(data: bytes, *, sysex_max: int = 4096) -> Kind | None:
    """The kind of one complete raw message, or None when it is malformed or too long."""
    if not data:
        return None
    status = data[0]
    if status < 0x80:
        return None
    if status == 0xF0:
        if len(data) < 2 or data[-1] != 0xF7 or len(data) > sysex_max:
            return None
        if any(b >= 0x80 for b in data[1:-1]):
            return None
        return Kind.SYSEX
    spec = _CHANNEL.get(status & 0xF0) if status < 0xF0 else _SYSTEM.get(status)
    if spec is None:
        return None
    kind, length = spec
    if len(data) != length:
        return None
    for b in data[1:]:
        if b >= 0x80:
            return None
    if kind is Kind.NOTE_ON and data[2] == 0:
        return Kind.NOTE_OFF  # running-status style note-off
    return kind


def channel(data: bytes) -> int:
    return data[0] & 0x0F


# Builders of the messages Cadenza writes itself. They do not validate (the hot path calls them
# with values it has already clamped); `classify` is the check for anything that came from outside.


def note_on(ch: int, pitch: int, velocity: int) -> bytes:
    return bytes((0x90 | ch, pitch, velocity))


def note_off(ch: int, pitch: int) -> bytes:
    """A note-off with release velocity 0 (status 0x8n, not a note-on with velocity 0)."""
    return bytes((0x80 | ch, pitch, 0))


def control(ch: int, cc: int, value: int) -> bytes:
    return bytes((0xB0 | ch, cc, value))


def pitch_bend(ch: int, value: int) -> bytes:
    """``value`` is the 14-bit bend, 0-16383 (8192 = centre), sent LSB first."""
    return bytes((0xE0 | ch, value & 0x7F, (value >> 7) & 0x7F))


def split_messages(payload: bytes) -> list[bytes]:
    """Cut a byte stream of complete messages (status byte each, no running status) into
    messages. Nothing is validated here: a stray run of data bytes, or a message cut short by
    the next status byte, comes out as its own chunk, which :func:`classify` then rejects — so
    a malformed stretch costs one counted drop and the messages after it still get through."""
    out: list[bytes] = []
    i, n = 0, len(payload)
    while i < n:
        status = payload[i]
        j = i + 1
        if status < 0x80 or status == 0xF0:  # stray data bytes, or SysEx up to its F7
            while j < n and payload[j] < 0x80:
                j += 1
            if status == 0xF0 and j < n and payload[j] == 0xF7:
                j += 1
        else:
            spec = _CHANNEL.get(status & 0xF0) if status < 0xF0 else _SYSTEM.get(status)
            end = i + (spec[1] if spec else 1)
            while j < min(end, n) and payload[j] < 0x80:
                j += 1
        out.append(payload[i:j])
        i = j
    return out
