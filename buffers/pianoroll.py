"""A sliding piano-roll window over live input, preallocated as a ring of frames.

Each frame (10 ms by default) holds, per pitch, the velocity of a note struck in that frame
(onset plane) and whether the key is down (frame plane). Advancing time clears only the frames
that scroll in; nothing is allocated per event. ``view()`` returns the ring and the index of its
oldest frame so a model can read it without a copy; ``ordered()`` makes the one copy a model that
needs time order asks for.
"""

from __future__ import annotations

import numpy as np


class PianoRollWindow:
    def __init__(self, *, frame_s: float = 0.010, window_s: float = 10.0, pitches: int = 128) -> None:
        self.frame_s = frame_s
        self.n_frames = max(1, int(round(window_s / frame_s)))
        self.onset = np.zeros((self.n_frames, pitches), np.uint8)  # velocity of onsets, 0 = none
        self.down = np.zeros((self.n_frames, pitches), bool)
        self._held = np.zeros(pitches, bool)
        self._frame = None  # absolute index of the newest frame

    def _abs_frame(self, t: float) -> int:
        return int(t // self.frame_s)

    def advance_to(self, t: float) -> None:
        """Scroll the window so its newest frame contains time ``t``; new frames carry held keys."""
        f = self._abs_frame(t)
        if self._frame is None:
            self._frame = f
            self.down[f % self.n_frames] = self._held
            return
        if f <= self._frame:
            return
        steps = min(f - self._frame, self.n_frames)
        for k in range(1, steps + 1):
            row = (f - steps + k) % self.n_frames
            self.onset[row] = 0
            self.down[row] = self._held
        self._frame = f

    def note_on(self, t: float, pitch: int, velocity: int) -> None:
        self.advance_to(t)
        row = self._frame % self.n_frames
        self.onset[row, pitch] = max(self.onset[row, pitch], velocity)
        self.down[row, pitch] = True
        self._held[pitch] = True

    def note_off(self, t: float, pitch: int) -> None:
        self.advance_to(t)
        self._held[pitch] = False

    @property
    def held(self) -> np.ndarray:
        return self._held

    def view(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(onset ring, down ring, row of the oldest frame): zero-copy access."""
        oldest = 0 if self._frame is None else (self._frame + 1) % self.n_frames
        return self.onset, self.down, oldest

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of both planes, oldest frame first."""
        onset, down, oldest = self.view()
        return np.roll(onset, -oldest, axis=0), np.roll(down, -oldest, axis=0)
