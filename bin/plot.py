"""Piano-roll pictures coloured by velocity (``colorize --plot``, the demo).

Each note is a horizontal line from onset to release at its pitch, its colour the velocity.
Notes are drawn as one LineCollection, so a 30,000-note piece still renders in about a second.
"""

from __future__ import annotations

import os

import numpy as np

from cadenza.atomic import atomic_path
from cadenza.midifile import Performance


def _roll(ax, perf: Performance, norm, cmap, label: str):
    from matplotlib.collections import LineCollection

    segs = np.stack([np.stack([perf.onset, perf.pitch], 1), np.stack([perf.offset, perf.pitch], 1)], 1)
    lc = LineCollection(segs, cmap=cmap, norm=norm, linewidths=2.0, capstyle="butt")
    lc.set_array(np.asarray(perf.velocity, float))
    ax.add_collection(lc)
    lo, hi = (int(perf.pitch.min()), int(perf.pitch.max())) if len(perf) else (21, 108)
    ax.set_ylim(lo - 2, hi + 2)
    ax.set_xlim(0, max(perf.end, 1e-3))
    ax.set_ylabel("pitch (MIDI)")
    v = np.asarray(perf.velocity, float)
    stats = f"mean {v.mean():.1f}, SD {v.std():.1f}" if len(v) else "no notes"
    ax.set_title(f"{label}  ({stats})", fontsize=10, loc="left")
    return lc


def plot_velocity_roll(
    perf_model: Performance, out_png: str | os.PathLike, *, reference: Performance | None = None, title: str | None = None
) -> None:
    """Write a PNG of the model's velocities (and the reference's, aligned, below it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    rows = 2 if reference is not None else 1
    width = float(np.clip(perf_model.end / 6.0, 8.0, 24.0))
    fig, axes = plt.subplots(rows, 1, figsize=(width, 3.2 * rows + 0.6), sharex=True, squeeze=False)
    norm, cmap = Normalize(1, 127), plt.get_cmap("magma")
    lc = _roll(axes[0, 0], perf_model, norm, cmap, "model velocities")
    if reference is not None:
        _roll(axes[1, 0], reference, norm, cmap, "the file's own velocities")
    axes[-1, 0].set_xlabel("time (s)")
    fig.colorbar(lc, ax=axes[:, 0].tolist(), label="velocity", fraction=0.03, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=11)
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
