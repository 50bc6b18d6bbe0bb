"""The open-note ledger: which notes went out and still need their note-off.

Stuck notes are the classic MIDI bug. Every note-on the engine sends is counted here per
(channel, pitch); every note-off uncounts it. The sustain pedal (CC 64) is followed per channel
too: a note released while the pedal is down keeps sounding, and All Notes Off does not lift the
pedal. ``release_all()`` produces exactly the note-offs that are owed, a pedal release where the
pedal is down, then All Notes Off (CC 123) on each channel that was used — the panic the engine
sends on shutdown, worker crash, mode switch or port loss.
"""

from __future__ import annotations

import numpy as np

from cadenza.messages import control, note_off


class NoteLedger:
    """Counts of sounding notes, preallocated: (16 channels, 128 pitches)."""

    def __init__(self) -> None:
        self._count = np.zeros((16, 128), np.int16)
        self._used = np.zeros(16, bool)
        self._pedal = np.zeros(16, bool)

    def note_on(self, channel: int, pitch: int) -> None:
        self._count[channel, pitch] += 1
        self._used[channel] = True

    def note_off(self, channel: int, pitch: int) -> bool:
        """Record a note-off; False if no such note was sounding (the note-off is still harmless)."""
        if self._count[channel, pitch] > 0:
            self._count[channel, pitch] -= 1
            return True
        return False

    def track(self, data: bytes) -> None:
        """Update the ledger from a raw outgoing message (any kind)."""
        if len(data) < 3:
            return
        kind = data[0] & 0xF0
        if kind == 0x90 and data[2] > 0:
            self.note_on(data[0] & 0x0F, data[1])
        elif kind == 0x80 or kind == 0x90:
            self.note_off(data[0] & 0x0F, data[1])
        elif kind == 0xB0:
            ch, cc = data[0] & 0x0F, data[1]
            if cc == 64:
                self._pedal[ch] = data[2] >= 64
                self._used[ch] = True
            elif cc in (120, 123):  # All Sound Off / All Notes Off
                self._count[ch, :] = 0
            elif cc == 121:  # Reset All Controllers lifts the pedal
                self._pedal[ch] = False

    def is_on(self, channel: int, pitch: int) -> bool:
        return bool(self._count[channel, pitch] > 0)

    @property
    def sounding(self) -> int:
        return int(self._count.sum())

    def held(self) -> list[tuple[int, int]]:
        ch, p = np.nonzero(self._count)
        return list(zip(ch.tolist(), p.tolist()))

    def release_all(self) -> list[bytes]:
        """The note-offs owed (one per sounding note-on), CC 64 = 0 where the pedal is down, then
        CC 123 on every used channel.

        The ledger is empty afterwards.
        """
        out: list[bytes] = []
        ch, p = np.nonzero(self._count)
        for c, n in zip(ch.tolist(), p.tolist()):
            out.extend(note_off(c, n) for _ in range(int(self._count[c, n])))
        for c in np.nonzero(self._pedal)[0].tolist():
            out.append(control(c, 64, 0))
        for c in np.nonzero(self._used)[0].tolist():
            out.append(control(c, 123, 0))
        self._count[:] = 0
        self._used[:] = False
        self._pedal[:] = False
        return out
