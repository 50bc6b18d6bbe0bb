"""report.md and its figures for `cadenza eval midi --report` and `cadenza eval phrase --report`.

Per set: ``<set>_distributions.png`` (every feature's histogram over the reference's),
``<set>_pianoroll.png`` and ``<set>_pitch.png`` (the piano roll and pitch trajectory of the
set's first non-empty performance); for all sets: ``comparison.png`` (overlap per feature, one
bar per set). Every file is written atomically; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cadenza.atomic import atomic_path, write_atomic
from cadenza.midifile import Performance
from cadenza.models.evaluation.midi import Collected
from cadenza.models.evaluation.stats import BINS, FEATURES, SetStats

ROLL_SECONDS = 30.0  # the piano roll and pitch trajectory show the first this many seconds


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "set"


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    _plt().close(fig)


def _centres(k: str) -> tuple[np.ndarray, np.ndarray]:
    b = BINS[k]
    return (b[:-1] + b[1:]) / 2, np.diff(b)


def plot_distributions(ref: SetStats, st: SetStats, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, k in zip(axes.flat, FEATURES):
        x, w = _centres(k)
        for s, colour, label in ((ref, "0.6", ref.name), (st, "tab:blue", st.name)):
            h = s.hist[k]
            ax.bar(x, h / h.sum() if h.sum() else h, width=w, color=colour, alpha=0.55, label=label, align="center")
        if k == "duration":
            ax.set_xscale("log")
        elif k == "step":  # chords put many steps at 0: linear there, logarithmic above 10 ms
            ax.set_xscale("symlog", linthresh=0.01)
        ax.set_title(k)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{st.name}: distributions (share of notes) over {ref.name}")
    fig.tight_layout()
    _save(fig, path)


def plot_roll(perf: Performance, title: str, path: Path) -> None:
    plt = _plt()
    from matplotlib.collections import LineCollection

    t0 = float(perf.onset.min())
    sel = perf.onset < t0 + ROLL_SECONDS
    on, off, p = perf.onset[sel] - t0, np.minimum(perf.offset[sel], t0 + ROLL_SECONDS) - t0, perf.pitch[sel]
    fig, ax = plt.subplots(figsize=(12, 4))
    segs = np.stack([np.stack([on, p], 1), np.stack([off, p], 1)], 1)
    lc = LineCollection(segs, cmap="viridis", linewidths=2.5)
    lc.set_array(np.asarray(perf.velocity[sel], float))
    lc.set_clim(0, 127)
    ax.add_collection(lc)
    ax.set_xlim(0, max(float(off.max(initial=0)), 1e-3))
    ax.set_ylim(float(p.min()) - 2, float(p.max()) + 2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("pitch (MIDI)")
    ax.set_title(f"{title}: piano roll (colour = velocity)", loc="left", fontsize=10)
    fig.colorbar(lc, ax=ax, pad=0.01)
    fig.tight_layout()
    _save(fig, path)


def plot_pitch(perf: Performance, title: str, path: Path) -> None:
    plt = _plt()
    t0 = float(perf.onset.min())
    sel = perf.onset < t0 + ROLL_SECONDS
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.plot(perf.onset[sel] - t0, perf.pitch[sel], "-", lw=0.8, alpha=0.6)
    ax.scatter(perf.onset[sel] - t0, perf.pitch[sel], s=6, c="tab:red")
    ax.set_xlabel("seconds")
    ax.set_ylabel("pitch")
    ax.set_title(f"{title}: pitch trajectory", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_comparison(result: dict, path: Path) -> None:
    plt = _plt()
    names = list(result["sets"])
    keys = (*FEATURES, "mean")
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(keys) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(keys))
    for i, n in enumerate(names):
        ax.bar(x + i * width, [result["sets"][n]["vs_reference"][k]["overlap"] for k in keys], width, label=n)
    ax.set_xticks(x + width * (len(names) - 1) / 2, keys)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"overlap with {result['reference']['name']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:.3f}"


def markdown(result: dict, figures: dict[str, list[str]], extra: str = "") -> str:
    names = list(result["sets"])
    ref = result["reference"]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    lines = [
        f"# MIDI statistics against {ref['name']}",
        "",
        f"Reference: {ref['name']}, {ref['files']} files, {ref['notes']:,} notes. Overlap: area shared by the two "
        "normalized histograms (1 = same distribution). KL: KL(reference ‖ set) in nats (0 = same).",
        "",
        "## Overlap / KL per feature",
        "",
        head.rstrip("\n"),
    ]
    for k in (*FEATURES, "mean"):
        cells = [
            f"{_fmt(result['sets'][n]['vs_reference'][k]['overlap'])} / {_fmt(result['sets'][n]['vs_reference'][k]['kl'])}" for n in names
        ]
        lines.append(f"| {'**mean**' if k == 'mean' else k} | " + " | ".join(cells) + " |")
    lines += ["", "## Summary", "", "| | " + ref["name"] + " | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    summary = [f for f in FEATURES if f != "pitch_class"]  # the mean of a circular quantity says nothing
    for k in ("files", "notes", "seconds", "notes_per_second", *(f"{f}_{m}" for f in summary for m in ("mean", "sd"))):
        lines.append(f"| {k} | {_fmt(ref.get(k))} | " + " | ".join(_fmt(result["sets"][n].get(k)) for n in names) + " |")
    skipped = {n: result["sets"][n]["skipped"] for n in names if result["sets"][n]["skipped"]}
    if skipped:
        lines += ["", "## Skipped files", ""] + [
            f"- {n}: {len(v)} ({', '.join(Path(p).name for p in v[:5])}{', …' if len(v) > 5 else ''})" for n, v in skipped.items()
        ]
    lines += ["", "## Figures", "", "![overlap per feature](comparison.png)", ""]
    for n, figs in figures.items():
        lines += [f"### {n}", ""] + [f"![{f}]({f})" for f in figs] + [""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def write_report(out_dir: Path, ref: SetStats, sets: list[Collected], result: dict, *, extra: str = "") -> Path:
    """report.md plus the figures in ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[str]] = {}
    for c in sets:
        s = slug(c.stats.name)
        figs = [f"{s}_distributions.png"]
        plot_distributions(ref, c.stats, out_dir / figs[0])
        if c.example is not None:
            figs += [f"{s}_pianoroll.png", f"{s}_pitch.png"]
            title = f"{c.stats.name} ({c.example_name})"
            plot_roll(c.example, title, out_dir / figs[1])
            plot_pitch(c.example, title, out_dir / figs[2])
        figures[c.stats.name] = figs
    plot_comparison(result, out_dir / "comparison.png")
    path = out_dir / "report.md"
    write_atomic(path, markdown(result, figures, extra).encode())
    return path
