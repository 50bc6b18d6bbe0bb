"""Evaluation of the velocity models on MAESTRO, next to constant-64 and the paper's figures.

Inputs are the performances with every velocity set to 64: the note features never read a
velocity, so the models see onsets, releases, pitches and pedal only. The paper averages the
per-note absolute error within each piece, then over pieces ("per-piece MAE"); the other
figures pool all notes of the split.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from cadenza.models.velocity.data import load_split
from cadenza.models.velocity.weights import weights_path

# He, Cooper, Huang, Togneri (CMMR 2025), MAESTRO v2 test, per-piece mean MAE; SD of predictions.
PAPER = {"U-Net (paper)": 11.48, "ConvAE (paper)": 12.33, "Kim 2023 seq2seq (paper)": 13.48, "constant 64 (paper)": 14.80}
PAPER_UNET_SD = 10.7
SWEEP = (0.0, 0.25, 0.5, 1.0, 2.0)


def metrics(data, preds: list[np.ndarray]) -> dict:
    y = data.velocity.astype(np.float64)
    p = np.concatenate(preds)
    err = p - y
    per_piece = [np.abs(pr - y[data.piece(k)]).mean() for k, pr in enumerate(preds)]
    return {
        "piece_mae": float(np.mean(per_piece)),
        "note_mae": float(np.abs(err).mean()),
        "mse": float((err**2).mean()),
        "within_12_7": float((np.abs(err) <= 12.7).mean()),
        "within_6_4": float((np.abs(err) <= 6.4).mean()),
        "sd": float(p.std()),
        "pearson_r": float(np.corrcoef(p, y)[0, 1]) if p.std() > 0 else 0.0,
        "notes": int(len(y)),
        "pieces": int(data.n_pieces),
    }


def _unet_preds(root: Path, data) -> list[np.ndarray]:
    from cadenza.midifile import MidiFile
    from cadenza.models.velocity.unet import load_unet, predict_unet  # imported only when its weights exist

    model = load_unet()
    out = []
    for name in data.names:
        perf = MidiFile.load(Path(root) / name).performance
        out.append(np.asarray(predict_unet(model, perf.with_velocity(np.full(len(perf), 64))), np.float64))
    return out


def evaluate(root: Path, split: str = "test", model: str = "all", *, limit: int | None = None, sweep: bool = True) -> dict:
    """All figures as a dict: ``rows`` (name -> metrics) and ``sweep`` (lookahead -> metrics)."""
    import torch

    from cadenza.models.velocity.causal import load_causal
    from cadenza.models.velocity.context import load_context, predict_split_context
    from cadenza.models.velocity.train import predict_split_causal

    data = load_split(root, split)
    if limit is not None:
        data = _head(data, limit)
    rows: dict[str, dict] = {}
    timing: dict[str, float] = {}
    rows["constant 64"] = metrics(data, [np.full(data.piece(k).stop - data.piece(k).start, 64.0) for k in range(data.n_pieces)])
    if model in ("causal", "all") and weights_path("causal").is_file():
        t = time.perf_counter()
        rows["causal (live, 0 s)"] = metrics(data, predict_split_causal(load_causal(), data))
        timing["causal"] = time.perf_counter() - t
    sweep_rows: dict[str, dict] = {}
    if model in ("context", "all") and weights_path("context").is_file():
        ctx = load_context()
        secs = [math.inf] + (list(SWEEP) if sweep else [1.0])
        t = time.perf_counter()
        per_s = predict_split_context(ctx, data, secs)
        timing["context"] = time.perf_counter() - t
        rows["context (offline)"] = metrics(data, per_s[0])
        for sec, preds in zip(secs[1:], per_s[1:]):
            sweep_rows[f"{sec:g}"] = metrics(data, preds)
        if "1" in sweep_rows:
            rows["context (lookahead 1 s)"] = sweep_rows["1"]
    if model in ("offline", "all") and weights_path("context").is_file():
        from cadenza.models.velocity.refine import load_refiner

        refiner = load_refiner()
        if refiner is not None:
            t = time.perf_counter()
            rows["offline (context + refiner)"] = metrics(data, predict_split_context(load_context(), data, math.inf, refiner=refiner))
            timing["offline"] = time.perf_counter() - t
    if model in ("unet", "all") and weights_path("unet").is_file():
        t = time.perf_counter()
        rows["U-Net (ours)"] = metrics(data, _unet_preds(root, data))
        timing["unet"] = time.perf_counter() - t
    torch.set_num_threads(torch.get_num_threads())
    return {"split": split, "rows": rows, "sweep": sweep_rows, "paper": PAPER, "paper_unet_sd": PAPER_UNET_SD, "seconds": timing}


def _head(data, limit: int):
    from cadenza.models.velocity.data import SplitData

    n = int(data.starts[min(limit, data.n_pieces)])
    return SplitData(
        data.names[:limit], data.starts[: limit + 1], data.onset[:n], data.offset[:n], data.pitch[:n], data.velocity[:n], data.features[:n]
    )


def format_table(res: dict) -> str:
    r0 = next(iter(res["rows"].values()))
    lines = [
        f"MAESTRO v2 {res['split']} ({r0['pieces']} pieces, {r0['notes']} notes), velocities in as 64",
        "",
        "| model | per-piece MAE | per-note MAE | MSE | within ±12.7 | within ±6.4 | SD of predictions | Pearson r |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in res["rows"].items():
        lines.append(
            f"| {name} | {m['piece_mae']:.2f} | {m['note_mae']:.2f} | {m['mse']:.1f} | {100 * m['within_12_7']:.1f} % | "
            f"{100 * m['within_6_4']:.1f} % | {m['sd']:.1f} | {m['pearson_r']:.3f} |"
        )
    for name, v in res["paper"].items():
        sd = f"{res['paper_unet_sd']:.1f}" if name.startswith("U-Net") else ""
        lines.append(f"| {name} | {v:.2f} | | | | | {sd} | |")
    if res["sweep"]:
        lines += [
            "",
            "Lookahead sweep (context model; note i sees notes with onset <= t_i + S):",
            "",
            "| lookahead S | per-piece MAE | per-note MAE | SD | Pearson r |",
            "|---:|---:|---:|---:|---:|",
        ]
        for s, m in res["sweep"].items():
            lines.append(f"| {s} s | {m['piece_mae']:.2f} | {m['note_mae']:.2f} | {m['sd']:.1f} | {m['pearson_r']:.3f} |")
    return "\n".join(lines)
