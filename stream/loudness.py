"""Integrated loudness (ITU-R BS.1770-4, the LUFS of EBU R128), measured block by block.

Used by offline rendering to loudness-match two renderings (the demo's flat.wav and result.wav):
a listener comparing two versions hears the louder one as better, so an A/B is only fair at equal
loudness. Peak levels say little about that for a piano, whose peaks are brief hammer strikes.

The K-weighting filter (a high shelf and a high pass, two biquads) is applied as an FIR made from
its own impulse response, long enough for that response to have died away, by FFT convolution:
numpy has no recursive filter, and this keeps the meter exact to well under 0.01 dB without scipy.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# The analogue prototype of BS.1770's K-weighting, so the filter can be made at any sample rate
# (the standard tabulates coefficients for 48 kHz only): stage 1 a high shelf, stage 2 a high pass.
_SHELF_DB, _SHELF_HZ, _SHELF_Q = 3.999843853973347, 1681.974450955533, 0.7071752369554196
_HP_HZ, _HP_Q = 38.13547087602444, 0.5003270373238773
ABSOLUTE_GATE = -70.0  # LUFS: blocks quieter than this are silence
RELATIVE_GATE = -10.0  # LU below the loudness of the blocks above the absolute gate


def k_weighting_biquads(rate: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(b, a) of the two stages at ``rate``, a[0] = 1 (bilinear transform of the prototypes)."""
    k = math.tan(math.pi * _SHELF_HZ / rate)
    vh, vb = 10 ** (_SHELF_DB / 20), (10 ** (_SHELF_DB / 20)) ** 0.4996667741545416
    a0 = 1 + k / _SHELF_Q + k * k
    shelf = (
        np.array([(vh + vb * k / _SHELF_Q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / _SHELF_Q + k * k) / a0]),
        np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / _SHELF_Q + k * k) / a0]),
    )
    k = math.tan(math.pi * _HP_HZ / rate)
    a0 = 1 + k / _HP_Q + k * k
    highpass = (np.array([1.0, -2.0, 1.0]), np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / _HP_Q + k * k) / a0]))
    return shelf, highpass


def _biquad(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    y = np.zeros_like(x)
    x1 = x2 = y1 = y2 = 0.0
    for n, xn in enumerate(x):  # runs once per sample rate, on an impulse (see k_weighting_fir)
        yn = b[0] * xn + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
        x2, x1, y2, y1 = x1, xn, y1, yn
        y[n] = yn
    return y


@functools.lru_cache(maxsize=4)
def k_weighting_fir(rate: int) -> np.ndarray:
    """The K-weighting filter's impulse response, cut where it has decayed below 1e-9."""
    n = 1 << max(10, math.ceil(math.log2(rate * 0.2)))  # the high pass rings for tens of ms
    impulse = np.zeros(n)
    impulse[0] = 1.0
    (b1, a1), (b2, a2) = k_weighting_biquads(rate)
    h = _biquad(b2, a2, _biquad(b1, a1, impulse))
    alive = np.flatnonzero(np.abs(h) > 1e-9 * np.abs(h).max())
    return h[: alive[-1] + 1]


class LoudnessMeter:
    """Feed (n, channels) blocks in order; :attr:`integrated` is the gated loudness in LUFS.

    Keeps the mean square of each 100 ms of K-weighted signal, so memory grows by one number per
    100 ms: a gating block (400 ms, 75 % overlap) is four consecutive segments.
    """

    def __init__(self, rate: int) -> None:
        self.rate = int(rate)
        self._h = k_weighting_fir(self.rate)
        self._hist: np.ndarray | None = None  # the last len(h) - 1 input frames
        self._seg = max(1, round(0.1 * self.rate))
        self._acc = 0.0  # sum of squares (all channels) in the current segment
        self._filled = 0
        self._segments: list[float] = []

    def add(self, block: np.ndarray) -> None:
        x = np.asarray(block, np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if len(x) == 0:
            return
        taps = len(self._h)
        if self._hist is None:
            self._hist = np.zeros((taps - 1, x.shape[1]))
        full = np.concatenate([self._hist, x])
        nfft = 1 << math.ceil(math.log2(len(full)))
        spec = np.fft.rfft(full, nfft, axis=0) * np.fft.rfft(self._h, nfft)[:, None]
        y = np.fft.irfft(spec, nfft, axis=0)[taps - 1 : len(full)]  # the 'valid' part: len(x) frames
        self._hist = full[len(full) - (taps - 1) :]
        sq = np.square(y).sum(axis=1)
        pos = 0
        while pos < len(sq):
            take = min(self._seg - self._filled, len(sq) - pos)
            self._acc += float(sq[pos : pos + take].sum())
            self._filled += take
            pos += take
            if self._filled == self._seg:
                self._segments.append(self._acc / self._seg)
                self._acc, self._filled = 0.0, 0

    @property
    def integrated(self) -> float:
        """Gated integrated loudness in LUFS; -inf for silence (shorter than a block: one block)."""
        return self.after_gain(0.0)

    def after_gain(self, gain_db: float) -> float:
        """The integrated loudness the signal would have after ``gain_db``.

        Not simply ``integrated + gain_db``: the absolute gate is a fixed level, so a gain moves
        blocks across it, and that moves the relative gate too.
        """
        seg = np.asarray(self._segments + ([self._acc / self._filled] if self._filled else [])) * 10 ** (gain_db / 10)
        if len(seg) == 0:
            return float("-inf")
        z = np.convolve(seg, np.full(4, 0.25), "valid") if len(seg) >= 4 else np.array([seg.mean()])
        with np.errstate(divide="ignore"):
            lk = -0.691 + 10 * np.log10(z)
        z = z[lk > ABSOLUTE_GATE]
        if len(z) == 0:
            return float("-inf")
        relative = -0.691 + 10 * np.log10(z.mean()) + RELATIVE_GATE
        z = z[-0.691 + 10 * np.log10(z) > relative]
        return float(-0.691 + 10 * np.log10(z.mean()))

    def gain_to(self, target_lufs: float) -> float:
        """The gain in dB that brings the integrated loudness to ``target_lufs`` (see after_gain)."""
        gain = 0.0
        for _ in range(8):  # the gates move little with the gain: this settles in a few steps
            miss = target_lufs - self.after_gain(gain)
            if not np.isfinite(miss) or abs(miss) < 1e-3:
                break
            gain += miss
        return gain
