"""Event tokens for phrase continuation, appendable as MIDI arrives.

The vocabulary is the Performance RNN / Music Transformer family: NOTE_ON pitch, NOTE_OFF pitch,
TIME_SHIFT (10 ms steps up to 1 s), VELOCITY (32 bins, emitted only when the bin changes) and
SUSTAIN on/off. Nothing in it needs a note's duration at its onset, so a live performance can be
tokenized event by event (:meth:`TokenStream.feed`) and the same class decodes generated tokens
back into events (:meth:`TokenStream.apply`), keeping one clock and one set of sounding notes.

Times are kept as an integer tick count from the stream's origin, so rounding never drifts: an
event at absolute time t is placed on tick round((t - t0) / quantum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cadenza.midifile import Performance

QUANTUM_S = 0.01
MAX_SHIFT = 100  # ticks per TIME_SHIFT token: 1 s
VELOCITY_BINS = 32
PEDAL_THRESHOLD = 64

# Vocabulary layout (contiguous ranges; a table, not an if-chain).
BOS = 0
NOTE_ON0 = 1  # 128 tokens
NOTE_OFF0 = NOTE_ON0 + 128  # 128 tokens
SHIFT0 = NOTE_OFF0 + 128  # TIME_SHIFT of 1..MAX_SHIFT ticks
VEL0 = SHIFT0 + MAX_SHIFT  # VELOCITY bins
SUSTAIN_ON = VEL0 + VELOCITY_BINS
SUSTAIN_OFF = SUSTAIN_ON + 1
VOCAB_SIZE = SUSTAIN_OFF + 1  # 391

ON, OFF, PEDAL = "on", "off", "pedal"


def velocity_bin(v: int) -> int:
    return min(VELOCITY_BINS - 1, max(0, int(v)) * VELOCITY_BINS // 128)


def bin_velocity(b: int) -> int:
    """The velocity a bin stands for (its centre)."""
    return int(b) * (128 // VELOCITY_BINS) + (128 // VELOCITY_BINS) // 2


def token_name(tok: int) -> str:
    tok = int(tok)
    if tok == BOS:
        return "BOS"
    if tok < NOTE_OFF0:
        return f"ON_{tok - NOTE_ON0}"
    if tok < SHIFT0:
        return f"OFF_{tok - NOTE_OFF0}"
    if tok < VEL0:
        return f"SHIFT_{tok - SHIFT0 + 1}"
    if tok < SUSTAIN_ON:
        return f"VEL_{tok - VEL0}"
    return "PED_ON" if tok == SUSTAIN_ON else "PED_OFF"


@dataclass
class Event:
    tick: int
    kind: str  # ON, OFF or PEDAL
    pitch: int = 0
    value: int = 0  # velocity for ON, 127/0 for PEDAL


class TokenStream:
    """Tokenizer state for one performance: clock, current velocity bin, pedal, sounding notes.

    ``feed`` turns an event into tokens (encoding); ``apply`` turns a token into an event
    (decoding). Both update the same state, so a live context can mix played and generated events.
    """

    def __init__(self, quantum: float = QUANTUM_S):
        self.quantum = quantum
        self.reset()

    def reset(self) -> None:
        self.t0: float | None = None
        self.tick = 0
        self.vel_bin = -1
        self.pedal = False
        self.sounding: set[int] = set()

    def copy(self) -> TokenStream:
        other = TokenStream(self.quantum)
        other.t0, other.tick, other.vel_bin, other.pedal = self.t0, self.tick, self.vel_bin, self.pedal
        other.sounding = set(self.sounding)
        return other

    # ---- time ---------------------------------------------------------------------------
    def time_of(self, tick: int) -> float:
        return (self.t0 or 0.0) + tick * self.quantum

    def tick_of(self, t: float) -> int:
        if self.t0 is None:
            self.t0 = float(t)
        return int(round((t - self.t0) / self.quantum))

    def advance_to(self, tick: int) -> list[int]:
        """TIME_SHIFT tokens that move the clock to ``tick`` (none if it is not later)."""
        out = []
        while tick > self.tick:
            step = min(MAX_SHIFT, tick - self.tick)
            out.append(SHIFT0 + step - 1)
            self.tick += step
        return out

    # ---- encoding -----------------------------------------------------------------------
    def feed(self, t: float, kind: str, pitch: int = 0, velocity: int = 0) -> list[int]:
        """Tokens for one event at absolute time ``t`` (seconds). Out-of-order times are clamped."""
        pitch = int(pitch) & 0x7F
        if kind == ON and velocity <= 0:
            kind = OFF
        toks: list[int]
        if kind == ON:
            toks = self.advance_to(self.tick_of(t))
            if pitch in self.sounding:  # re-struck key: close the old note so the grammar stays simple
                toks.append(NOTE_OFF0 + pitch)
            b = velocity_bin(velocity)
            if b != self.vel_bin:
                toks.append(VEL0 + b)
                self.vel_bin = b
            toks.append(NOTE_ON0 + pitch)
            self.sounding.add(pitch)
        elif kind == OFF:
            if pitch not in self.sounding:
                return []
            toks = self.advance_to(self.tick_of(t))
            toks.append(NOTE_OFF0 + pitch)
            self.sounding.discard(pitch)
        elif kind == PEDAL:
            down = velocity >= PEDAL_THRESHOLD
            if down == self.pedal:
                return []
            toks = self.advance_to(self.tick_of(t))
            toks.append(SUSTAIN_ON if down else SUSTAIN_OFF)
            self.pedal = down
        else:
            raise ValueError(f"unknown event kind {kind!r}")
        return toks

    # ---- decoding -----------------------------------------------------------------------
    def apply(self, tok: int) -> Event | None:
        """Update the state with one (generated) token; return the event it completes, if any."""
        tok = int(tok)
        if tok == BOS:
            return None
        if tok < NOTE_OFF0:
            pitch = tok - NOTE_ON0
            self.sounding.add(pitch)
            return Event(self.tick, ON, pitch, bin_velocity(self.vel_bin if self.vel_bin >= 0 else VELOCITY_BINS // 2))
        if tok < SHIFT0:
            pitch = tok - NOTE_OFF0
            if pitch not in self.sounding:
                return None
            self.sounding.discard(pitch)
            return Event(self.tick, OFF, pitch)
        if tok < VEL0:
            self.tick += tok - SHIFT0 + 1
            return None
        if tok < SUSTAIN_ON:
            self.vel_bin = tok - VEL0
            return None
        down = tok == SUSTAIN_ON
        if down == self.pedal:
            return None
        self.pedal = down
        return Event(self.tick, PEDAL, 0, 127 if down else 0)


def message_event(msg: bytes) -> tuple[str, int, int] | None:
    """(kind, pitch, value) of a raw MIDI message the tokens know (note on/off, CC64), else None."""
    if len(msg) < 3:
        return None
    kind = msg[0] & 0xF0
    if kind == 0x90 and msg[2] > 0:
        return ON, msg[1], msg[2]
    if kind in (0x80, 0x90):
        return OFF, msg[1], 0
    if kind == 0xB0 and msg[1] == 64:
        return PEDAL, 0, msg[2]
    return None


def performance_events(perf: Performance) -> list[tuple[float, int, str, int, int]]:
    """(time, order, kind, pitch, value) for every note edge and pedal change, in stream order.

    A key struck again while still held would make its first release end the second note, so each
    note is cut at the next onset of the same pitch. At equal times releases come first (except
    the release of a zero-length note, which follows its own onset).
    """
    onset = np.asarray(perf.onset, np.float64)
    offset = np.asarray(perf.offset, np.float64).copy()
    pitch = np.asarray(perf.pitch, np.int64)
    order = np.lexsort((onset, pitch))
    same = pitch[order][1:] == pitch[order][:-1]
    nxt = onset[order][1:]
    cut = np.where(same, np.minimum(offset[order][:-1], nxt), offset[order][:-1])
    offset[order[:-1]] = cut
    offset = np.maximum(offset, onset)
    # a zero-length note is released after it is struck, not before
    ev = [(float(t), 3 if t <= s else 0, OFF, int(p), 0) for s, t, p in zip(onset, offset, pitch)]
    ev += [(float(t), 2, ON, int(p), int(v)) for t, p, v in zip(onset, pitch, perf.velocity)]
    ev += [(float(t), 1, PEDAL, 0, int(v)) for t, v in zip(perf.pedal_t, perf.pedal_v)]
    ev.sort(key=lambda e: (e[0], e[1], e[3]))  # total order: the same notes always give the same tokens
    return ev


def encode_performance(perf: Performance, *, bos: bool = True) -> np.ndarray:
    """Tokens (uint16) of a whole performance, with its first event at tick 0."""
    stream = TokenStream()
    toks = [BOS] if bos else []
    for t, _, kind, p, v in performance_events(perf):
        toks.extend(stream.feed(t, kind, p, v))
    return np.asarray(toks, np.uint16)


def decode_tokens(tokens, *, t0: float = 0.0, stream: TokenStream | None = None, channel: int = 0) -> Performance:
    """A :class:`Performance` from tokens; notes still sounding at the end are closed there."""
    st = stream or TokenStream()
    if st.t0 is None:
        st.t0 = t0
    open_on: dict[int, tuple[int, int]] = {}
    notes: list[tuple[int, int, int, int]] = []
    ped_t: list[float] = []
    ped_v: list[int] = []
    for tok in tokens:
        ev = st.apply(int(tok))
        if ev is None:
            continue
        if ev.kind == ON:
            if ev.pitch in open_on:  # only possible for hand-made sequences: end the old note
                s, v = open_on.pop(ev.pitch)
                notes.append((s, ev.tick, ev.pitch, v))
            open_on[ev.pitch] = (ev.tick, ev.value)
        elif ev.kind == OFF:
            if ev.pitch in open_on:  # a note begun before these tokens has no onset here
                s, v = open_on.pop(ev.pitch)
                notes.append((s, ev.tick, ev.pitch, v))
        else:
            ped_t.append(st.time_of(ev.tick))
            ped_v.append(ev.value)
    for p, (s, v) in open_on.items():
        notes.append((s, st.tick, p, v))
    notes.sort(key=lambda n: (n[0], n[2]))
    arr = np.asarray(notes, np.int64).reshape(-1, 4)
    return Performance(
        onset=st.time_of(0) + arr[:, 0] * st.quantum,
        offset=st.time_of(0) + arr[:, 1] * st.quantum,
        pitch=arr[:, 2].astype(np.int16),
        velocity=arr[:, 3].astype(np.int16),
        channel=np.full(len(arr), channel, np.int8),
        pedal_t=np.asarray(ped_t, np.float64),
        pedal_v=np.asarray(ped_v, np.int16),
    )
