"""Standard MIDI files: every read and write of a ``.mid`` file in Cadenza goes through here.

Cadenza only ever changes note-on velocities in files it colorizes, so instead of parsing into
objects and writing a new file (which reorders meta events, rewrites running status and so on),
it parses the byte stream once, remembers where each note-on's velocity byte lives, and patches
those bytes in a copy of the original. Every other byte of the file stays as it was. For the same
reason a continuation is *appended* as a new track (:meth:`MidiFile.with_track`) rather than
written into a re-encoded file.

Public API: :class:`Performance` (notes as arrays), :class:`MidiFile` (``load``,
``with_velocities``, ``with_track``, ``seconds_to_ticks``), :func:`load_performance`,
:func:`write_performance` (a fresh one-track file), and the byte-level helpers :func:`read_vlq`,
:func:`write_vlq`, :func:`track_chunk` and :data:`DATA_BYTES`.

The parser is strict about structure (chunk lengths, truncated events) and reports problems as
one-line :class:`~cadenza.errors.MidiFileError` messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cadenza.atomic import atomic_path, write_atomic  # noqa: F401  (re-exported)
from cadenza.errors import MidiFileError

SUSTAIN_CC = 64


@dataclass
class Performance:
    """The notes of a piece, sorted by (onset, pitch); times in seconds.

    ``offset`` is the key release (not extended by the pedal). ``pedal_t``/``pedal_v`` are the
    sustain-pedal (CC 64) events of all channels, in time order.
    """

    onset: np.ndarray  # (N,) float64
    offset: np.ndarray  # (N,) float64
    pitch: np.ndarray  # (N,) int16
    velocity: np.ndarray  # (N,) int16
    channel: np.ndarray  # (N,) int8
    pedal_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pedal_v: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))

    def __len__(self) -> int:
        return len(self.onset)

    @property
    def end(self) -> float:
        return float(max(self.offset.max(initial=0.0), self.pedal_t.max(initial=0.0)))

    def with_velocity(self, velocity: np.ndarray) -> Performance:
        return Performance(self.onset, self.offset, self.pitch, np.asarray(velocity, np.int16), self.channel, self.pedal_t, self.pedal_v)

    def pedal_at(self, t: np.ndarray, threshold: int = 64) -> np.ndarray:
        """Whether the sustain pedal is down at each time in ``t`` (bool array)."""
        if len(self.pedal_t) == 0:
            return np.zeros(len(t), bool)
        idx = np.searchsorted(self.pedal_t, t, side="right") - 1
        down = self.pedal_v >= threshold
        return np.where(idx >= 0, down[np.maximum(idx, 0)], False)


@dataclass
class MidiFile:
    """A parsed standard MIDI file that can be written back with new note-on velocities."""

    path: Path
    data: bytes
    performance: Performance
    velocity_offsets: np.ndarray  # byte offset of each note's velocity, in performance order
    tempo_tick: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # Set Tempo events, all tracks
    tempo_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # microseconds per beat

    @classmethod
    def load(cls, path: str | os.PathLike) -> MidiFile:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MidiFileError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise MidiFileError(f"{path}: is a directory, not a MIDI file") from None
        except OSError as exc:
            raise MidiFileError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            perf, offsets, tempo_tick, tempo_val = _parse(data)
        except MidiFileError as exc:
            raise MidiFileError(f"{path}: {exc}") from None
        return cls(path, data, perf, offsets, tempo_tick, tempo_val)

    @property
    def format(self) -> int:
        return int.from_bytes(self.data[8:10], "big")

    def seconds_to_ticks(self, seconds: float) -> int:
        """The tick of this file at ``seconds`` from its start, through its tempo map (the inverse
        of what the parser does), so an appended event lines up in any player or DAW."""
        division = int.from_bytes(self.data[12:14], "big")
        if division & 0x8000:
            return int(round(seconds / _smpte_seconds_per_tick(division)))
        tt, tv, seg_sec = _tempo_segments(division, self.tempo_tick, self.tempo_val)
        i = max(0, int(np.searchsorted(seg_sec, seconds, side="right")) - 1)
        return int(round(tt[i] + (seconds - seg_sec[i]) * 1e6 * division / tv[i]))

    def with_track(self, events: Iterable[tuple[float, bytes]], *, name: bytes = b"") -> bytes:
        """The file's bytes with one more track holding ``events`` (seconds, raw message).

        Every byte of the existing tracks is kept; the header's track count goes up by one and a
        format-0 file becomes format 1, which is the same music."""
        if self.format == 2:
            raise MidiFileError(f"{self.path}: format 2 (independent patterns) cannot take another track")
        ntracks = int.from_bytes(self.data[10:12], "big")
        if ntracks >= 0xFFFF:
            raise MidiFileError(f"{self.path}: already has the maximum number of tracks")
        data = bytearray(self.data)
        data[8:10] = (1).to_bytes(2, "big")
        data[10:12] = (ntracks + 1).to_bytes(2, "big")
        return bytes(data) + track_chunk([(self.seconds_to_ticks(t), m) for t, m in events], name=name)

    def with_velocities(self, velocity: np.ndarray) -> bytes:
        """The file's bytes with each note-on velocity replaced (performance order)."""
        velocity = np.asarray(velocity)
        if velocity.shape != self.velocity_offsets.shape:
            raise ValueError(f"expected {len(self.velocity_offsets)} velocities, got {velocity.shape}")
        v = np.clip(np.rint(velocity), 1, 127).astype(np.uint8)
        buf = np.frombuffer(self.data, np.uint8).copy()
        buf[self.velocity_offsets] = v
        return buf.tobytes()

    def save_with_velocities(self, velocity: np.ndarray, out: str | os.PathLike) -> None:
        write_atomic(out, self.with_velocities(velocity))


def load_performance(path: str | os.PathLike) -> Performance:
    return MidiFile.load(path).performance


# --------------------------------------------------------------------------------------------
# Parsing

DATA_BYTES = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2}


def read_vlq(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The variable-length number at ``data[pos:end]`` and the position after it."""
    value = 0
    for _ in range(4):
        if pos >= end:
            raise MidiFileError("truncated variable-length number")
        b = data[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, pos
    raise MidiFileError("variable-length number longer than 4 bytes")


def parse(data: bytes) -> tuple[Performance, np.ndarray]:
    """Parse SMF bytes into a :class:`Performance` and the velocity-byte offsets of its notes."""
    perf, offsets, _, _ = _parse(data)
    return perf, offsets


def _parse(data: bytes) -> tuple[Performance, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`parse`, plus the tempo map: (tick, microseconds per beat) of every Set Tempo."""
    if len(data) < 14 or data[:4] != b"MThd":
        raise MidiFileError("not a standard MIDI file (no MThd header)")
    hlen = int.from_bytes(data[4:8], "big")
    if hlen < 6 or 8 + hlen > len(data):
        raise MidiFileError("bad MThd header length")
    fmt = int.from_bytes(data[8:10], "big")
    ntracks = int.from_bytes(data[10:12], "big")
    division = int.from_bytes(data[12:14], "big")
    if fmt > 2:
        raise MidiFileError(f"unknown MIDI file format {fmt}")
    if division == 0:
        raise MidiFileError("division of 0 ticks per beat")

    # Per event kind, parallel lists: (tick, track, ...)
    on_tick, on_track, on_chan, on_pitch, on_vel, on_off = [], [], [], [], [], []
    off_tick, off_track, off_chan, off_pitch = [], [], [], []
    ped_tick, ped_val = [], []
    tempo_tick, tempo_val = [], []

    pos = 8 + hlen
    track = 0
    while pos + 8 <= len(data) and track < ntracks:
        ctype = data[pos : pos + 4]
        clen = int.from_bytes(data[pos + 4 : pos + 8], "big")
        start = pos + 8
        end = start + clen
        if end > len(data):
            raise MidiFileError(f"track {track} is truncated ({len(data) - start} of {clen} bytes)")
        pos = end
        if ctype != b"MTrk":
            continue  # unknown chunks are skipped, as the standard asks
        tick = 0
        p = start
        status = 0
        while p < end:
            delta, p = read_vlq(data, p, end)
            tick += delta
            if p >= end:
                raise MidiFileError(f"track {track}: truncated event")
            b = data[p]
            if b == 0xFF:
                if p + 2 > end:
                    raise MidiFileError(f"track {track}: truncated meta event")
                mtype = data[p + 1]
                mlen, q = read_vlq(data, p + 2, end)
                if q + mlen > end:
                    raise MidiFileError(f"track {track}: truncated meta event")
                if mtype == 0x51 and mlen == 3:
                    tempo_tick.append(tick)
                    tempo_val.append(int.from_bytes(data[q : q + 3], "big"))
                p = q + mlen
                if mtype == 0x2F:
                    break
                continue
            if b in (0xF0, 0xF7):
                slen, q = read_vlq(data, p + 1, end)
                if q + slen > end:
                    raise MidiFileError(f"track {track}: truncated SysEx")
                p = q + slen
                status = 0
                continue
            if b & 0x80:
                status = b
                p += 1
            elif status == 0:
                raise MidiFileError(f"track {track}: data byte without a status (corrupt event at byte {p})")
            kind = status & 0xF0
            n = DATA_BYTES.get(kind)
            if n is None:
                raise MidiFileError(f"track {track}: unexpected status byte 0x{status:02X}")
            if p + n > end:
                raise MidiFileError(f"track {track}: truncated channel message")
            d1 = data[p]
            chan = status & 0x0F
            if kind == 0x90 and data[p + 1] > 0:
                on_tick.append(tick)
                on_track.append(track)
                on_chan.append(chan)
                on_pitch.append(d1)
                on_vel.append(data[p + 1])
                on_off.append(p + 1)
            elif kind == 0x80 or kind == 0x90:
                off_tick.append(tick)
                off_track.append(track)
                off_chan.append(chan)
                off_pitch.append(d1)
            elif kind == 0xB0 and d1 == SUSTAIN_CC:
                ped_tick.append(tick)
                ped_val.append(data[p + 1])
            p += n
        track += 1
    if track == 0:
        raise MidiFileError("no track data")

    tempo_tick_a, tempo_val_a = np.asarray(tempo_tick, np.int64), np.asarray(tempo_val, np.int64)
    to_sec = _tick_to_seconds(division, tempo_tick_a, tempo_val_a)

    onset_tick = np.asarray(on_tick, np.int64)
    offset_tick = _pair_offsets(on_tick, on_track, on_chan, on_pitch, off_tick, off_track, off_chan, off_pitch)
    onset = to_sec(onset_tick)
    offset = to_sec(offset_tick)
    pitch = np.asarray(on_pitch, np.int16)
    order = np.lexsort((pitch, onset))
    ped_tick_a = np.asarray(ped_tick, np.int64)
    ped_order = np.argsort(ped_tick_a, kind="stable")
    perf = Performance(
        onset=onset[order],
        offset=np.maximum(offset[order], onset[order]),
        pitch=pitch[order],
        velocity=np.asarray(on_vel, np.int16)[order],
        channel=np.asarray(on_chan, np.int8)[order],
        pedal_t=to_sec(ped_tick_a[ped_order]),
        pedal_v=np.asarray(ped_val, np.int16)[ped_order],
    )
    return perf, np.asarray(on_off, np.int64)[order], tempo_tick_a, tempo_val_a


def _pair_offsets(on_tick, on_track, on_chan, on_pitch, off_tick, off_track, off_chan, off_pitch) -> np.ndarray:
    """Match each note-on with its note-off: first on, first off, per (track, channel, pitch).

    A note-on that is never released ends at the last tick of the file; a repeated note-on of a
    sounding key does not end the earlier note (the file's own note-off does).
    """
    events = [(t, 1, i) for i, t in enumerate(on_tick)] + [(t, 0, i) for i, t in enumerate(off_tick)]
    # At equal ticks handle note-offs first, so a key released and struck on the same tick pairs right.
    events.sort(key=lambda e: (e[0], e[1]))
    last_tick = events[-1][0] if events else 0
    result = np.full(len(on_tick), last_tick, np.int64)
    open_notes: dict[tuple[int, int, int], list[int]] = {}
    for t, is_on, i in events:
        if is_on:
            open_notes.setdefault((on_track[i], on_chan[i], on_pitch[i]), []).append(i)
        else:
            stack = open_notes.get((off_track[i], off_chan[i], off_pitch[i]))
            if stack:
                result[stack.pop(0)] = t
    return result


def _smpte_seconds_per_tick(division: int) -> float:
    """SMPTE division: frames per second and ticks per frame; no tempo map applies."""
    fps = 256 - (division >> 8)
    return 1.0 / ((29.97 if fps == 29 else fps) * (division & 0xFF))


def _tempo_segments(division: int, tempo_tick: np.ndarray, tempo_val: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tempo map as segments: start tick, microseconds per beat, start second (120 bpm
    until the first Set Tempo, as the standard says)."""
    order = np.argsort(tempo_tick, kind="stable")
    tt = tempo_tick[order]
    tv = tempo_val[order]
    if len(tt) == 0 or tt[0] != 0:
        tt = np.concatenate([[0], tt])
        tv = np.concatenate([[500_000], tv])
    seg_sec = np.concatenate([[0.0], np.cumsum(np.diff(tt) * tv[:-1] / (1e6 * division))])
    return tt, tv, seg_sec


def _tick_to_seconds(division: int, tempo_tick: np.ndarray, tempo_val: np.ndarray):
    if division & 0x8000:
        sec_per_tick = _smpte_seconds_per_tick(division)
        return lambda ticks: np.asarray(ticks, np.float64) * sec_per_tick
    tt, tv, seg_sec = _tempo_segments(division, tempo_tick, tempo_val)

    def convert(ticks: np.ndarray) -> np.ndarray:
        ticks = np.asarray(ticks, np.int64)
        i = np.searchsorted(tt, ticks, side="right") - 1
        return seg_sec[i] + (ticks - tt[i]) * tv[i] / (1e6 * division)

    return convert


# --------------------------------------------------------------------------------------------
# Writing


def write_vlq(n: int) -> bytes:
    """``n`` as a MIDI variable-length number (7 bits a byte, high bit = more follows)."""
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def track_chunk(events: Iterable[tuple[int, bytes]], *, name: bytes = b"") -> bytes:
    """One ``MTrk`` chunk: an optional track name, then (absolute tick, complete raw message)
    in order (a tick earlier than the one before is played at the one before), then End of
    Track. Messages are written with their status byte each (no running status)."""
    body = bytearray(b"\x00\xff\x03" + write_vlq(len(name)) + name if name else b"")
    last = 0
    for tick, msg in events:
        tick = max(tick, last)
        body += write_vlq(tick - last) + msg
        last = tick
    body += b"\x00\xff\x2f\x00"
    return b"MTrk" + len(body).to_bytes(4, "big") + bytes(body)


def write_performance(perf: Performance, out: str | os.PathLike, *, ticks_per_beat: int = 480, tempo: int = 500_000) -> None:
    """Write notes and sustain pedal as a one-track SMF (atomic)."""
    import mido

    sec_per_tick = tempo / 1e6 / ticks_per_beat
    events: list[tuple[int, int, mido.Message]] = []
    for on, off, p, v, c in zip(perf.onset, perf.offset, perf.pitch, perf.velocity, perf.channel):
        t_on = int(round(on / sec_per_tick))
        t_off = max(int(round(off / sec_per_tick)), t_on + 1)
        events.append((t_on, 2, mido.Message("note_on", channel=int(c), note=int(p), velocity=int(np.clip(v, 1, 127)))))
        events.append((t_off, 0, mido.Message("note_off", channel=int(c), note=int(p), velocity=0)))
    for t, v in zip(perf.pedal_t, perf.pedal_v):
        events.append((int(round(t / sec_per_tick)), 1, mido.Message("control_change", channel=0, control=SUSTAIN_CC, value=int(v))))
    events.sort(key=lambda e: (e[0], e[1]))
    mid = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    trk = mido.MidiTrack()
    trk.append(mido.MetaMessage("set_tempo", tempo=tempo, time=0))
    last = 0
    for t, _, msg in events:
        trk.append(msg.copy(time=t - last))
        last = t
    trk.append(mido.MetaMessage("end_of_track", time=0))
    mid.tracks.append(trk)
    with atomic_path(out) as tmp:
        mid.save(tmp)
