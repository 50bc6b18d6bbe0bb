"""A sliding piano-roll window over live input, preallocated as a ring of frames.

Each frame (10 ms by default) holds, per pitch, the velocity of a note struck in that frame
(onset plane) and whether the key is down (frame plane). Advancing time moves a head index and
clears the frames that scrolled in with at most two slice assignments (the ring wraps once at
most), so a note after a long pause costs what any note costs: no Python loop over the frames of
the pause (`cadenza bench window` measures it). Nothing is allocated per event.

Readers: ``view()`` gives the ring and the row of its oldest frame without a copy; ``ordered()``
makes the one copy a model that needs time order asks for; ``melody_steps()`` reads the last bars
as a monophonic top-voice melody on a sixteenth grid, the input of a MusicVAE "vary" mode.
"""

from __future__ import annotations

import numpy as np

# The melody event convention shared with the MusicVAE models (magenta's melody encoding, as
# integers from 0): one event per sixteenth step.
NO_EVENT = 0
NOTE_OFF = 1
FIRST_NOTE_ON = 2
MIN_PITCH = 21  # MusicVAE's melody range: the 88 piano keys
MAX_PITCH = 108


def melody_event(pitch: int, *, min_pitch: int = MIN_PITCH, max_pitch: int = MAX_PITCH) -> int:
    """The event of a note-on of ``pitch``: ``pitch - min_pitch + 2``, after moving a pitch
    outside the range by octaves into it (a melody keeps its shape, not its register)."""
    while pitch < min_pitch:
        pitch += 12
    while pitch > max_pitch:
        pitch -= 12
    return pitch - min_pitch + FIRST_NOTE_ON


class PianoRollWindow:
    def __init__(self, *, frame_s: float = 0.010, window_s: float = 10.0, pitches: int = 128) -> None:
        self.frame_s = frame_s
        self.n_frames = max(1, int(round(window_s / frame_s)))
        self.onset = np.zeros((self.n_frames, pitches), np.uint8)  # velocity of onsets, 0 = none
        self.down = np.zeros((self.n_frames, pitches), bool)
        self._held = np.zeros(pitches, bool)
        self._frame: int | None = None  # absolute index of the newest frame
        self._head = 0  # its row in the ring

    def _abs_frame(self, t: float) -> int:
        return int(t // self.frame_s)

    def advance_to(self, t: float) -> None:
        """Scroll the window so its newest frame contains time ``t``; new frames carry held keys."""
        f = self._abs_frame(t)
        if self._frame is None:
            self._frame, self._head = f, f % self.n_frames
            self.down[self._head] = self._held
            return
        if f <= self._frame:
            return
        steps = min(f - self._frame, self.n_frames)
        start = (self._head + 1) % self.n_frames  # first row to clear; the rows run on, wrapping once
        first = min(steps, self.n_frames - start)
        self._clear(start, start + first)
        if steps > first:
            self._clear(0, steps - first)
        self._frame, self._head = f, f % self.n_frames

    def _clear(self, a: int, b: int) -> None:
        self.onset[a:b] = 0
        self.down[a:b] = self._held

    def note_on(self, t: float, pitch: int, velocity: int) -> None:
        self.advance_to(t)
        row = self._head
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
        oldest = 0 if self._frame is None else (self._head + 1) % self.n_frames
        return self.onset, self.down, oldest

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of both planes, oldest frame first."""
        onset, down, oldest = self.view()
        return np.roll(onset, -oldest, axis=0), np.roll(down, -oldest, axis=0)

    def melody_steps(self, end_t: float, steps: int, seconds_per_step: float) -> np.ndarray:
        """The top voice of the ``steps`` sixteenths that end at ``end_t``, as melody events.

        Per step: the highest pitch struck in it starts a note (:func:`melody_event`); a step
        where the current note's key is up (and nothing is struck) ends it (``NOTE_OFF``, once);
        otherwise ``NO_EVENT``. ``end_t`` is a grid line (from MIDI clock, or free time at a
        set tempo); the window must reach back ``steps * seconds_per_step`` (ValueError if not)
        and is scrolled to ``end_t`` first. A note held into the first step from before it
        counts as struck there (the melody starts with what sounds).
        """
        if steps * seconds_per_step > self.n_frames * self.frame_s + 1e-9:
            raise ValueError(
                f"{steps} steps of {seconds_per_step * 1e3:.0f} ms need a window of {steps * seconds_per_step:.1f} s "
                f"(engine.window_s is {self.n_frames * self.frame_s:g} s)"
            )
        events = np.zeros(steps, np.int16)
        if self._frame is None:
            return events
        self.advance_to(end_t)
        onset, down = self.ordered()
        newest = self._frame
        # Frame boundaries of each step (as absolute frames, then rows); before the window is silence.
        bounds = ((end_t - seconds_per_step * np.arange(steps, -1, -1)) // self.frame_s).astype(np.int64)  # as _abs_frame rounds
        rows = bounds - (newest - self.n_frames + 1)  # row in time order (0 = oldest)
        current = -1  # pitch sounding in the melody, -1 = none
        for s in range(steps):
            a, b = max(0, rows[s]), min(self.n_frames, rows[s + 1])
            if b <= a:
                continue
            struck = np.flatnonzero(onset[a:b].any(axis=0))
            if s == 0 and struck.size == 0:
                struck = np.flatnonzero(down[a])
            if struck.size:
                current = int(struck[-1])
                events[s] = melody_event(current)
            elif current >= 0 and not down[b - 1, current]:
                events[s] = NOTE_OFF
                current = -1
        return events
